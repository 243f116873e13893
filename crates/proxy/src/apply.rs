//! The applier: the first sync of a process writes the whole table in one transaction (an
//! existing table is replaced atomically, so established connections keep their conntrack NAT
//! and new ones see either the old or the new rules); every later sync sends only the
//! [`diff`](crate::plan::diff). The table is never read back.

use crate::plan::{diff, Ruleset};

#[derive(Default)]
pub struct Applier {
    current: Option<Ruleset>,
}

impl Applier {
    /// Makes the kernel hold `new`; returns how many script lines were sent (0: nothing changed).
    pub fn sync(&mut self, new: Ruleset) -> Result<usize, String> {
        let script = match &self.current {
            None => new.render(),
            Some(old) => diff(old, &new),
        };
        if !script.is_empty() {
            if let Err(e) = nft::apply(&script) {
                // The kernel may not hold what we think: start over with a full write next time.
                self.current = None;
                return Err(e.to_string());
            }
        }
        self.current = Some(new);
        Ok(script.lines().count())
    }
}
