//! What the downloader's test files share.

use std::time::{Duration, Instant};

use cairn_pubsub::Subscription;
use cairn_types::ContentTreeStatus;
use uuid::Uuid;

/// Waits up to `wait` for the status of `tree` to satisfy `pred`; panics naming `what` and the
/// last status otherwise.
pub async fn status_where(
    statuses: &mut Subscription<ContentTreeStatus>,
    tree: Uuid,
    what: &str,
    wait: Duration,
    pred: impl Fn(&ContentTreeStatus) -> bool,
) -> ContentTreeStatus {
    let key = tree.to_string();
    let deadline = Instant::now() + wait;
    loop {
        if let Some(s) = statuses.get(&key)
            && pred(s)
        {
            return s.clone();
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "content tree {tree}: never {what}; last {:?}",
            statuses.get(&key)
        );
        let _ = tokio::time::timeout(left, statuses.recv()).await;
    }
}
