//! Interned strings for low-cardinality values (categories, channels, plans, actions, string
//! attributes' values).
//!
//! Per-customer state stores a 4-byte [`Sym`] instead of a string, so a customer's
//! per-category counts cost 8 bytes each. The table is append-only and shared (`Arc`) between
//! the rule compiler (which interns the literals rules compare against), the engine and
//! readers such as the HTTP API. Lookups take a read lock only; a new value takes a write
//! lock once.
//!
//! Values are hashed with foldhash, seeded at random per process: about three times faster
//! than the standard library's SipHash on these short strings, and, like it, not predictable
//! from the input alone. Every event with a category, channel, plan or action looks one up,
//! and a restore looks up every string of every record.

use std::sync::{Arc, RwLock, RwLockReadGuard};

type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

use smallvec::SmallVec;

/// An interned string id.
pub type Sym = u32;

#[derive(Default)]
struct Inner {
    /// By the string's bytes, so that a changelog record's strings are looked up before they
    /// are checked as UTF-8, which only a string new to the table needs.
    ids: HashMap<Box<[u8]>, Sym>,
    names: Vec<Arc<str>>,
}

/// The shared symbol table.
#[derive(Default)]
pub struct Symbols {
    inner: RwLock<Inner>,
}

impl std::fmt::Debug for Symbols {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Symbols({})", self.len())
    }
}

impl Symbols {
    pub fn new() -> Self {
        Self::default()
    }

    /// Returns the id of `s`, interning it if new.
    pub fn intern(&self, s: &str) -> Sym {
        if let Some(id) = self.get(s) {
            return id;
        }
        let mut w = self.inner.write().unwrap_or_else(|p| p.into_inner());
        if let Some(&id) = w.ids.get(s.as_bytes()) {
            return id;
        }
        let id = w.names.len() as Sym;
        w.names.push(Arc::from(s));
        w.ids.insert(Box::from(s.as_bytes()), id);
        id
    }

    /// The id of `s` if it was ever interned.
    pub fn get(&self, s: &str) -> Option<Sym> {
        self.read().get(s)
    }

    /// The ids of many strings given as bytes, in order: looked up under one read lock, and
    /// only the new ones checked as UTF-8 and interned (each then takes the write lock).
    /// `None` if a new one is not UTF-8.
    pub fn intern_all<C: FromIterator<Sym>>(&self, strings: &[&[u8]]) -> Option<C> {
        let known: SmallVec<[Option<Sym>; 16]> = {
            let names = self.read();
            strings.iter().map(|s| names.get_bytes(s)).collect()
        };
        known
            .iter()
            .zip(strings)
            .map(|(k, s)| match k {
                Some(id) => Some(*id),
                None => std::str::from_utf8(s).ok().map(|s| self.intern(s)),
            })
            .collect()
    }

    /// The string of an id (empty if unknown, which cannot happen for ids this table issued).
    pub fn name(&self, id: Sym) -> Arc<str> {
        let r = self.inner.read().unwrap_or_else(|p| p.into_inner());
        r.names
            .get(id as usize)
            .cloned()
            .unwrap_or_else(|| Arc::from(""))
    }

    /// A read view for many lookups under one lock. Do not intern while holding it.
    pub fn read(&self) -> Names<'_> {
        Names(self.inner.read().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn len(&self) -> usize {
        self.inner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .names
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A read view of [`Symbols`] (see [`Symbols::read`]).
pub struct Names<'a>(RwLockReadGuard<'a, Inner>);

impl Names<'_> {
    /// The string of an id (empty if unknown, as for [`Symbols::name`]).
    pub fn name(&self, id: Sym) -> &str {
        self.0.names.get(id as usize).map_or("", |s| s)
    }

    /// The id of `s` if it was ever interned.
    pub fn get(&self, s: &str) -> Option<Sym> {
        self.get_bytes(s.as_bytes())
    }

    /// The id of the string with these bytes, if it was ever interned.
    pub fn get_bytes(&self, s: &[u8]) -> Option<Sym> {
        self.0.ids.get(s).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interns_once() {
        let s = Symbols::new();
        let a = s.intern("online");
        let b = s.intern("store");
        assert_ne!(a, b);
        assert_eq!(s.intern("online"), a);
        assert_eq!(&*s.name(b), "store");
        assert_eq!(s.get("nope"), None);
        let names = s.read();
        assert_eq!(
            (names.name(a), names.name(b), names.name(99)),
            ("online", "store", "")
        );
        assert_eq!((names.get("store"), names.get("nope")), (Some(b), None));
        drop(names);
        let ids: Option<Vec<Sym>> = s.intern_all(&[b"store", b"web", b"online", b"web"]);
        let web = s.get("web").unwrap();
        assert_eq!(ids, Some(vec![b, web, a, web]));
        assert_eq!(s.len(), 3);
        // A new string that is not UTF-8 is refused, and those after it are not interned.
        let bad: Option<Vec<Sym>> = s.intern_all(&[b"store", b"\xff", b"new"]);
        assert_eq!(bad, None);
        assert_eq!((s.len(), s.get("new")), (3, None));
    }
}
