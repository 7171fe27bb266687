//! The tally of a run: one `MAPCOUNT-CHECK` line per comparison of a
//! known answer with what mapcountd reported.

#[derive(Default)]
pub(crate) struct Checker {
    pub(crate) passed: u32,
    pub(crate) failed: u32,
}

impl Checker {
    pub(crate) fn exact(&mut self, name: &str, known: usize, reported: f64) {
        self.range(name, known, reported, known as f64, known as f64);
    }

    /// A line for a comparison this kernel cannot make: neither passed nor failed.
    pub(crate) fn not_applicable(&mut self, name: &str, why: &str) {
        println!("MAPCOUNT-NOTE {name} not applicable: {why}");
    }

    /// `reported` must lie in `[at_least, at_most]`.
    pub(crate) fn range(&mut self, name: &str, known: usize, reported: f64, at_least: f64, at_most: f64) {
        let ok = reported >= at_least && reported <= at_most;
        if ok {
            self.passed += 1
        } else {
            self.failed += 1
        }
        println!(
            "MAPCOUNT-CHECK {name} known={known} reported={reported} accepted={at_least}..={at_most} {}",
            if ok { "PASS" } else { "FAIL" }
        );
    }
}
