//! What every test command counts: one check's result, and the tally of a run.

#[derive(Default)]
pub struct Tally {
    pub passed: u32,
    pub failed: u32,
}

impl Tally {
    pub fn add(&mut self, ok: bool) {
        if ok {
            self.passed += 1;
        } else {
            self.failed += 1;
        }
    }

    /// An error naming how many `what` checks failed, if any did.
    pub fn result(&self, what: &str) -> anyhow::Result<()> {
        if self.failed > 0 {
            anyhow::bail!("{} {what} check(s) failed", self.failed);
        }
        Ok(())
    }
}

/// One check: what the kernel says (known), what mapcount reported, and
/// what is accepted.
pub struct CheckResult {
    pub name: String,
    pub known: String,
    pub reported: String,
    pub accepted: String,
    pub passed: bool,
}

impl CheckResult {
    pub fn failed(name: &str, why: &str) -> Self {
        Self {
            name: name.to_owned(),
            known: "-".to_owned(),
            reported: why.to_owned(),
            accepted: "-".to_owned(),
            passed: false,
        }
    }
}
