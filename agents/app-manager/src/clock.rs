//! The executor's clock. On a device it is the wall clock. A test can inject its own with
//! `CAIRN_TEST_CLOCK=<RFC 3339 start>x<speed>` (e.g. `2026-03-28T20:00:00Zx3600`: the device's
//! time starts then and runs 3,600 times faster), so that a schedule's hours pass in seconds
//! through the real agents. The machine never reads a clock; only the executor does, here.

use chrono::{DateTime, Utc};

pub const TEST_CLOCK_ENV: &str = "CAIRN_TEST_CLOCK";

#[derive(Debug, Clone, Copy)]
pub struct Clock {
    injected: Option<Injected>,
}

#[derive(Debug, Clone, Copy)]
struct Injected {
    start: DateTime<Utc>,
    began: std::time::Instant,
    speed: f64,
}

impl Clock {
    pub fn wall() -> Self {
        Self { injected: None }
    }

    /// The wall clock, unless [`TEST_CLOCK_ENV`] injects one; a malformed value is an error
    /// naming the variable, never silently the wall clock.
    pub fn from_env() -> Result<Self, String> {
        match std::env::var(TEST_CLOCK_ENV) {
            Err(_) => Ok(Self::wall()),
            Ok(text) => {
                Self::parse(&text).map_err(|why| format!("{TEST_CLOCK_ENV}={text:?}: {why}"))
            }
        }
    }

    fn parse(text: &str) -> Result<Self, String> {
        let (start, speed) = text
            .rsplit_once('x')
            .ok_or("expected <RFC 3339 start>x<speed>, e.g. 2026-03-28T20:00:00Zx3600")?;
        let start = DateTime::parse_from_rfc3339(start)
            .map_err(|e| format!("start time: {e}"))?
            .with_timezone(&Utc);
        let speed: f64 = speed.parse().map_err(|e| format!("speed: {e}"))?;
        if !(speed.is_finite() && speed > 0.0) {
            return Err("speed must be a positive number".into());
        }
        Ok(Self {
            injected: Some(Injected {
                start,
                began: std::time::Instant::now(),
                speed,
            }),
        })
    }

    pub fn is_injected(&self) -> bool {
        self.injected.is_some()
    }

    pub fn now(&self) -> DateTime<Utc> {
        match self.injected {
            None => Utc::now(),
            Some(i) => {
                let elapsed = i.began.elapsed().mul_f64(i.speed);
                i.start + chrono::Duration::from_std(elapsed).unwrap_or(chrono::Duration::MAX)
            }
        }
    }

    /// How long to really sleep until the clock shows `at`.
    pub fn until(&self, at: DateTime<Utc>) -> std::time::Duration {
        let device = (at - self.now()).to_std().unwrap_or_default();
        match self.injected {
            None => device,
            Some(i) => device.div_f64(i.speed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_injected_clock_starts_where_told_and_runs_fast() {
        let clock = Clock::parse("2026-03-28T20:00:00Zx3600").unwrap();
        let start = DateTime::parse_from_rfc3339("2026-03-28T20:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        std::thread::sleep(std::time::Duration::from_millis(50));
        let now = clock.now();
        // 50 ms real = 180 s on the injected clock (give or take the scheduler).
        assert!(now >= start + chrono::Duration::seconds(170), "{now}");
        assert!(now < start + chrono::Duration::seconds(3600), "{now}");
        let sleep = clock.until(now + chrono::Duration::hours(1));
        assert!(sleep <= std::time::Duration::from_secs(1), "{sleep:?}");
        for bad in [
            "2026-03-28T20:00:00Z",
            "yesterdayx10",
            "2026-03-28T20:00:00Zx0",
        ] {
            assert!(Clock::parse(bad).is_err(), "{bad}");
        }
        assert!(!Clock::wall().is_injected());
    }
}
