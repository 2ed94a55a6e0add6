//! Uploading (EVE's loguploader): the oldest queued file is POSTed as is (gzip bytes, no
//! AuthContainer, as loguploader does) to `/api/v2/edgedevice/id/<device>/newlogs` or
//! `.../apps/instanceid/<app>/newlogs`. 200/201: the file is removed. 503, no answer or a
//! timeout: the same file again after a doubling delay. Another 4xx: retried, and after ten
//! refusals of the same file it is moved to `failedUpload/` so the queue moves on.

use std::time::Duration;

use cairn_controller_client::https::{Https, HttpsError};
use uuid::Uuid;

use crate::queue::{MAX_UPLOAD_BYTES, Queued, Stream};

/// loguploader's `max4xxRetries`.
pub const MAX_4XX_RETRIES: u32 = 10;

pub fn path_of(device: Uuid, stream: Stream) -> String {
    match stream {
        Stream::Device => format!("/api/v2/edgedevice/id/{device}/newlogs"),
        Stream::App(app) => {
            format!("/api/v2/edgedevice/id/{device}/apps/instanceid/{app}/newlogs")
        }
    }
}

/// What to do with a file after one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Taken: remove it and send the next at once.
    Sent,
    /// The controller is busy or unreachable: the same file again after the backoff.
    Later(String),
    /// Refused (4xx): counted; the same file again after the backoff.
    Refused(u16),
}

pub fn outcome(answer: Result<u16, &HttpsError>) -> Outcome {
    match answer {
        Ok(200 | 201) => Outcome::Sent,
        Ok(status @ 400..=499) => Outcome::Refused(status),
        Ok(status) => Outcome::Later(format!("the controller answered {status}")),
        Err(e) => Outcome::Later(e.to_string()),
    }
}

/// Sends one file; a file over loguploader's hard limit is refused here, never sent. Err: the
/// file could not be read.
pub async fn send(https: &Https, device: Uuid, file: &Queued) -> std::io::Result<Outcome> {
    let path = file.path.clone();
    let body = tokio::task::spawn_blocking(move || std::fs::read(path)).await??;
    if body.len() as u64 > MAX_UPLOAD_BYTES {
        return Ok(Outcome::Refused(413));
    }
    let answer = https.post(&path_of(device, file.stream), body).await;
    Ok(outcome(answer.as_ref().map(|r| r.status)))
}

/// Doubling delay between failed attempts, back to `min` after a success.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            next: min,
        }
    }

    pub fn failed(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }

    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_taken_as_loguploader_takes_them() {
        assert_eq!(outcome(Ok(200)), Outcome::Sent);
        assert_eq!(outcome(Ok(201)), Outcome::Sent);
        assert!(matches!(outcome(Ok(503)), Outcome::Later(_)));
        assert!(matches!(outcome(Ok(500)), Outcome::Later(_)));
        assert_eq!(outcome(Ok(404)), Outcome::Refused(404));
        let timeout = HttpsError::Address("x".into());
        assert!(matches!(outcome(Err(&timeout)), Outcome::Later(_)));
    }

    #[test]
    fn the_backoff_doubles_to_its_cap_and_resets() {
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(5));
        let delays: Vec<u64> = (0..5).map(|_| backoff.failed().as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 5, 5]);
        backoff.reset();
        assert_eq!(backoff.failed(), Duration::from_secs(1));
    }

    #[test]
    fn endpoints_are_eves() {
        let device = Uuid::nil();
        let app = Uuid::from_u128(1);
        assert_eq!(
            path_of(device, Stream::Device),
            "/api/v2/edgedevice/id/00000000-0000-0000-0000-000000000000/newlogs"
        );
        assert_eq!(
            path_of(device, Stream::App(app)),
            "/api/v2/edgedevice/id/00000000-0000-0000-0000-000000000000/apps/instanceid/00000000-0000-0000-0000-000000000001/newlogs"
        );
    }
}
