//! Interned strings for low-cardinality values (categories, channels, plans, actions).
//!
//! Per-customer state stores a 4-byte [`Sym`] instead of a string, so a customer's
//! per-category counts cost 8 bytes each. The table is append-only and shared (`Arc`) between
//! the rule compiler (which interns the literals rules compare against), the engine and
//! readers such as the HTTP API. Lookups take a read lock only; a new value takes a write
//! lock once.

use std::collections::HashMap;
use std::sync::{Arc, RwLock, RwLockReadGuard};

use smallvec::SmallVec;

/// An interned string id.
pub type Sym = u32;

#[derive(Default)]
struct Inner {
    ids: HashMap<Arc<str>, Sym>,
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
        if let Some(&id) = w.ids.get(s) {
            return id;
        }
        let id = w.names.len() as Sym;
        let name: Arc<str> = Arc::from(s);
        w.names.push(name.clone());
        w.ids.insert(name, id);
        id
    }

    /// The id of `s` if it was ever interned.
    pub fn get(&self, s: &str) -> Option<Sym> {
        self.read().get(s)
    }

    /// The ids of many strings, in order: looked up under one read lock, and only the new
    /// ones interned (each then takes the write lock).
    pub fn intern_all<C: FromIterator<Sym>>(&self, strings: &[&str]) -> C {
        let known: SmallVec<[Option<Sym>; 16]> = {
            let names = self.read();
            strings.iter().map(|s| names.get(s)).collect()
        };
        known
            .iter()
            .zip(strings)
            .map(|(k, s)| k.unwrap_or_else(|| self.intern(s)))
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
        let ids: Vec<Sym> = s.intern_all(&["store", "web", "online", "web"]);
        let web = s.get("web").unwrap();
        assert_eq!(ids, vec![b, web, a, web]);
        assert_eq!(s.len(), 3);
    }
}
