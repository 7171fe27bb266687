//! Rate limits for log lines that a client or the kernel can repeat at
//! will: a hostile client must not fill the journal.

use std::time::{Duration, Instant};

/// Lets one line through per interval and counts the ones held back.
#[derive(Debug)]
pub struct Throttle {
    interval: Duration,
    next: Option<Instant>,
    suppressed: u64,
}

impl Throttle {
    pub fn new(interval: Duration) -> Self {
        Self { interval, next: None, suppressed: 0 }
    }

    /// `Some(n)` when a line may be written at `now`, with `n` the lines
    /// held back since the last one written (to say in it); `None` when
    /// this one is held back.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        if self.next.is_some_and(|next| now < next) {
            self.suppressed += 1;
            return None;
        }
        self.next = Some(now + self.interval);
        Some(std::mem::take(&mut self.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_with_the_count_of_the_others() {
        let mut throttle = Throttle::new(Duration::from_secs(60));
        let start = Instant::now();
        assert_eq!(throttle.allow(start), Some(0));
        for i in 1..=840 {
            assert_eq!(throttle.allow(start + Duration::from_millis(i)), None);
        }
        assert_eq!(throttle.allow(start + Duration::from_secs(60)), Some(840));
        assert_eq!(throttle.allow(start + Duration::from_secs(61)), None);
    }
}
