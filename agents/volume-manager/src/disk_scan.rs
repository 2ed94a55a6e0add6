//! The disk scan of directory volumes (EVE's volumemgr `diskMetricsTimerTask`): every
//! `timer.metric.diskscan.interval` each directory volume's tree is walked on the blocking pool
//! and its allocated bytes become `VolumeStatus.current_size`, which the metrics report reads.
//! One scan at a time, off the manager's task: a large tree delays only the next scan, never
//! the bus. Image files are measured apart, by a stat each (`VolumeManager::refresh_sizes`).

use std::path::PathBuf;
use std::time::Duration;

use cairn_types::ConfigItemValueMap;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::volumes;

/// EVE's config item for the scan period, in seconds.
pub const DISK_SCAN_ITEM: &str = "timer.metric.diskscan.interval";
/// EVE's default and bounds (pillar `types/global.go`: 300 s, 5 s to 1 h); a value outside
/// them gives the default, as EVE's `parseValue` does.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(300);
const MIN_S: u64 = 5;
const MAX_S: u64 = 3600;

/// The scan period the config items ask for (`None`: no config yet).
pub fn interval(items: Option<&ConfigItemValueMap>) -> Duration {
    let Some(text) = items.and_then(|i| i.items.get(DISK_SCAN_ITEM)) else {
        return DEFAULT_INTERVAL;
    };
    match text.trim().parse::<u64>() {
        Ok(s) if (MIN_S..=MAX_S).contains(&s) => Duration::from_secs(s),
        _ => {
            tracing::warn!(item = DISK_SCAN_ITEM, value = %text, min = MIN_S, max = MAX_S, "not a number of seconds within EVE's bounds; the default applies");
            DEFAULT_INTERVAL
        }
    }
}

/// When the next scan is due, and the one running.
pub struct DiskScan {
    period: Duration,
    next: Instant,
    running: Option<JoinHandle<Vec<(String, u64)>>>,
}

impl Default for DiskScan {
    fn default() -> Self {
        Self::new()
    }
}

impl DiskScan {
    /// The first scan is due at once: the sizes a restart reloaded may be old.
    pub fn new() -> Self {
        Self {
            period: DEFAULT_INTERVAL,
            next: Instant::now(),
            running: None,
        }
    }

    /// A new period applies from now if it brings the next scan closer.
    pub fn set_period(&mut self, period: Duration) {
        if period != self.period {
            tracing::info!(period_s = period.as_secs(), "disk scan period");
        }
        self.period = period;
        self.next = self.next.min(Instant::now() + period);
    }

    /// When the next scan may start (`None` while one runs).
    pub fn due(&self) -> Option<Instant> {
        self.running.is_none().then_some(self.next)
    }

    /// Starts walking `trees` on the blocking pool.
    pub fn start(&mut self, trees: Vec<(String, PathBuf)>) {
        self.running = Some(tokio::task::spawn_blocking(move || {
            trees
                .into_iter()
                .map(|(key, path)| (key, volumes::allocated_size(&path)))
                .collect()
        }));
    }

    /// The sizes of the running scan, once it ends (pending while none runs: select on it
    /// only when [`Self::due`] is `None`). The next one is due a period from now.
    pub async fn finished(&mut self) -> Vec<(String, u64)> {
        let Some(running) = self.running.as_mut() else {
            return std::future::pending().await;
        };
        let sizes = running.await.unwrap_or_else(|e| {
            tracing::error!(error = %e, "the disk scan failed");
            Vec::new()
        });
        self.running = None;
        self.next = Instant::now() + self.period;
        sizes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(value: &str) -> ConfigItemValueMap {
        ConfigItemValueMap {
            items: [(DISK_SCAN_ITEM.to_string(), value.to_string())].into(),
        }
    }

    #[test]
    fn the_period_is_eves_item_within_its_bounds_else_its_default() {
        assert_eq!(interval(None), DEFAULT_INTERVAL);
        assert_eq!(interval(Some(&items("5"))), Duration::from_secs(5));
        assert_eq!(interval(Some(&items("3600"))), Duration::from_secs(3600));
        assert_eq!(interval(Some(&items("4"))), DEFAULT_INTERVAL);
        assert_eq!(interval(Some(&items("3601"))), DEFAULT_INTERVAL);
        assert_eq!(interval(Some(&items("soon"))), DEFAULT_INTERVAL);
    }
}
