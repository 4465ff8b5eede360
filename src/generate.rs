//! Synthetic B2B customers and their events, for the demo, `microseg generate` and benchmarks.
//!
//! This module owns the generator: firmographics (industry, company size, country, job role)
//! and personas whose purchase and engagement patterns differ and drift over simulated time —
//! growers buy more and more, steady buyers keep a rhythm, faders slow down and go quiet,
//! churners stop after an early burst, browsers engage without buying, whales place big
//! orders. Deterministic for a given seed. Pure apart from the caller's I/O.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::time::{format_rfc3339, DAY_MS};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Persona {
    Grower,
    Steady,
    Fader,
    Churner,
    Browser,
    Whale,
}

const PERSONAS: [(Persona, u32); 6] = [
    (Persona::Grower, 15),
    (Persona::Steady, 30),
    (Persona::Fader, 20),
    (Persona::Churner, 15),
    (Persona::Browser, 15),
    (Persona::Whale, 5),
];
const INDUSTRIES: [&str; 6] = [
    "finance",
    "retail",
    "healthcare",
    "manufacturing",
    "tech",
    "education",
];
const COUNTRIES: [&str; 6] = ["DE", "FR", "NL", "US", "GB", "ES"];
const ROLES: [&str; 5] = ["cto", "buyer", "ops_manager", "analyst", "founder"];
const CATEGORIES: [&str; 6] = [
    "licenses",
    "hardware",
    "consulting",
    "support",
    "training",
    "cloud",
];
const ACTIONS: [&str; 5] = ["email_open", "email_click", "page_view", "webinar", "login"];

struct Customer {
    persona: Persona,
    /// Simulated day on which the customer changes behaviour (fades, churns).
    turn_day: f64,
    profile_sent: bool,
}

/// Which input a generated event belongs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Purchase,
    Engagement,
    Profile,
}

/// One generated event.
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    pub customer_id: String,
    pub kind: Kind,
    pub json: String,
}

/// A deterministic event generator over simulated time.
pub struct Generator {
    rng: SmallRng,
    customers: Vec<Customer>,
    now: i64,
    ms_per_event: i64,
    start: i64,
    seq: u64,
    /// One in this many events is deliberately malformed (0 = never).
    pub malformed_every: u64,
}

impl Generator {
    /// `customers` customers, simulated time starting at `start_ms` and advancing
    /// `ms_per_event` per generated event.
    pub fn new(seed: u64, customers: usize, start_ms: i64, ms_per_event: i64) -> Generator {
        let mut rng = SmallRng::seed_from_u64(seed);
        let total: u32 = PERSONAS.iter().map(|(_, w)| w).sum();
        let customers = (0..customers.max(1))
            .map(|_| {
                let mut pick = rng.gen_range(0..total);
                let persona = PERSONAS
                    .iter()
                    .find(|(_, w)| {
                        if pick < *w {
                            true
                        } else {
                            pick -= w;
                            false
                        }
                    })
                    .map_or(Persona::Steady, |(p, _)| *p);
                Customer {
                    persona,
                    turn_day: rng.gen_range(10.0..40.0),
                    profile_sent: false,
                }
            })
            .collect();
        Generator {
            rng,
            customers,
            now: start_ms,
            ms_per_event: ms_per_event.max(0),
            start: start_ms,
            seq: 0,
            malformed_every: 0,
        }
    }

    /// The simulated time of the latest event.
    pub fn now(&self) -> i64 {
        self.now
    }

    /// Chance that an event for this persona at this day is a purchase, and its activity level.
    fn behaviour(c: &Customer, day: f64) -> (f64, f64) {
        match c.persona {
            Persona::Grower => (
                0.15 + 0.5 * (day / 60.0).min(1.0),
                0.5 + (day / 30.0).min(1.5),
            ),
            Persona::Steady => (0.35, 1.0),
            Persona::Fader if day > c.turn_day => (0.05, 0.15 / (1.0 + day - c.turn_day)),
            Persona::Fader => (0.35, 1.0),
            Persona::Churner if day > c.turn_day => (0.0, 0.0),
            Persona::Churner => (0.5, 1.2),
            Persona::Browser => (0.02, 1.0),
            Persona::Whale => (0.45, 0.8),
        }
    }

    /// The next event (always succeeds; customers who went quiet are skipped).
    pub fn next_event(&mut self) -> Generated {
        self.now += self.ms_per_event;
        self.seq += 1;
        let day = (self.now - self.start) as f64 / DAY_MS as f64;
        let n = self.customers.len();
        let (idx, p_purchase) = loop {
            let i = self.rng.gen_range(0..n);
            let (p, activity) = Self::behaviour(&self.customers[i], day);
            if self.rng.gen_bool((activity / 2.5).clamp(0.0, 1.0))
                || !self.customers[i].profile_sent
            {
                break (i, p);
            }
        };
        let customer_id = format!("c-{idx}");
        let event_id = format!("e-{}", self.seq);
        let ts = format_rfc3339(self.now);
        if self.malformed_every > 0 && self.seq.is_multiple_of(self.malformed_every) {
            let json = format!(
                r#"{{"event_id":"{event_id}","customer_id":"{customer_id}","type":"purchase","timestamp":"{ts}","amount":"twelve euros"}}"#
            );
            return Generated {
                customer_id,
                kind: Kind::Purchase,
                json,
            };
        }
        let c = &mut self.customers[idx];
        if !c.profile_sent {
            c.profile_sent = true;
            let industry = INDUSTRIES[self.rng.gen_range(0..INDUSTRIES.len())];
            let size = (10.0 * (self.rng.gen_range(0.0f64..6.0)).exp()).round() as u64;
            let country = COUNTRIES[self.rng.gen_range(0..COUNTRIES.len())];
            let role = ROLES[self.rng.gen_range(0..ROLES.len())];
            let json = format!(
                r#"{{"event_id":"{event_id}","customer_id":"{customer_id}","type":"profile","timestamp":"{ts}","attributes":{{"industry":"{industry}","company_size":{size},"country":"{country}","job_role":"{role}"}}}}"#
            );
            return Generated {
                customer_id,
                kind: Kind::Profile,
                json,
            };
        }
        let persona = c.persona;
        if self.rng.gen_bool(p_purchase.clamp(0.0, 1.0)) {
            let base = match persona {
                Persona::Whale => 900.0,
                Persona::Grower => 120.0 + 4.0 * day,
                _ => 80.0,
            };
            let amount = (base * self.rng.gen_range(0.3..2.0) * 100.0f64).round() / 100.0;
            let category = CATEGORIES[self.rng.gen_range(0..CATEGORIES.len())];
            let channel = if self.rng.gen_bool(0.65) {
                "online"
            } else {
                "sales_rep"
            };
            let plan = if self.rng.gen_bool(0.3) {
                "annual"
            } else {
                "monthly"
            };
            let qty = self.rng.gen_range(1..10);
            let json = format!(
                r#"{{"event_id":"{event_id}","customer_id":"{customer_id}","type":"purchase","timestamp":"{ts}","amount":{amount},"currency":"EUR","category":"{category}","channel":"{channel}","plan":"{plan}","quantity":{qty}}}"#
            );
            Generated {
                customer_id,
                kind: Kind::Purchase,
                json,
            }
        } else {
            let action = ACTIONS[self.rng.gen_range(0..ACTIONS.len())];
            let json = format!(
                r#"{{"event_id":"{event_id}","customer_id":"{customer_id}","type":"engagement","action":"{action}","timestamp":"{ts}"}}"#
            );
            Generated {
                customer_id,
                kind: Kind::Engagement,
                json,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::decode;

    #[test]
    fn deterministic_and_decodable() {
        let mut a = Generator::new(7, 100, 0, 1000);
        let mut b = Generator::new(7, 100, 0, 1000);
        let mut kinds = [0; 3];
        for _ in 0..2000 {
            let (x, y) = (a.next_event(), b.next_event());
            assert_eq!(x, y);
            let ev = decode(x.json.as_bytes()).unwrap_or_else(|e| panic!("{}: {e}", x.json));
            assert_eq!(ev.customer_id, x.customer_id);
            kinds[x.kind as usize] += 1;
        }
        assert!(
            kinds.iter().all(|k| *k > 50),
            "all kinds generated: {kinds:?}"
        );
    }

    #[test]
    fn malformed_events_on_request() {
        let mut g = Generator::new(1, 10, 0, 1);
        g.malformed_every = 10;
        let bad = (0..100)
            .filter(|_| decode(g.next_event().json.as_bytes()).is_err())
            .count();
        assert_eq!(bad, 10);
    }
}
