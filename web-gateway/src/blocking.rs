//! The server's blocking work (record checks, `statvfs`, the tokens file) on one thread of its
//! own, for as long as the server lives.
//!
//! Why not tokio's blocking pool: `cairn up` lives for months, and glibc gives every thread
//! that allocates a malloc arena of its own (up to eight per core), kept for the life of the
//! process and never trimmed at its top. The pool starts a thread for each call that finds
//! none idle and lets idle ones go after 10 s, so 20 pages fetching after a change, or a
//! record check on every core, would leave the process with an arena per thread ever running
//! at once. One thread holds one arena, and what it allocates is small: one record at a time,
//! the verdicts, a `statvfs`. The rendering (the view, the rows, the body) runs on the
//! runtime's thread, which in `cairn up` is the main thread, whose heap is trimmed after each.

use std::sync::mpsc;

type Job = Box<dyn FnOnce() + Send>;

/// A handle on the thread; the thread ends when the last handle is dropped.
#[derive(Clone)]
pub struct Blocking {
    jobs: mpsc::Sender<Job>,
}

/// The job panicked (a bug: the thread goes on with the next), or the thread has stopped.
#[derive(Debug, thiserror::Error)]
#[error("the web read-out's file work failed")]
pub struct Failed;

impl Blocking {
    pub fn start() -> std::io::Result<Self> {
        let (jobs, queue) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("cairn-web-io".into())
            .spawn(move || {
                // The jobs one after the other: a page waits for a rendering anyway, and one
                // at a time is what keeps this thread's heap to one job's.
                while let Ok(job) = queue.recv() {
                    // A panic drops the job's answer: its caller gets `Failed`, the rest go on.
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                }
            })?;
        Ok(Self { jobs })
    }

    /// Runs `work` on the thread and waits for its result without blocking the runtime.
    pub async fn run<T, F>(&self, work: F) -> Result<T, Failed>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let (done, result) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Box::new(move || {
                // The caller may have gone (its request was dropped): nobody to tell.
                let _ = done.send(work());
            }))
            .map_err(|_| Failed)?;
        result.await.map_err(|_| Failed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn every_job_runs_on_the_one_thread_and_a_panic_fails_only_its_own() {
        let io = Blocking::start().unwrap();
        let here = std::thread::current().id();
        let first = io.run(|| std::thread::current().id()).await.unwrap();
        assert_ne!(first, here, "the job ran on the runtime's thread");
        let panicked = io.run(|| -> u32 { panic!("a bug in a job") }).await;
        assert!(panicked.is_err(), "a panicking job gave an answer");
        for _ in 0..10 {
            let (a, b) = tokio::join!(
                io.run(|| std::thread::current().id()),
                io.run(|| std::thread::current().id())
            );
            assert_eq!(
                (a.unwrap(), b.unwrap()),
                (first, first),
                "a job ran on another thread (or the thread died with the panic)"
            );
        }
    }
}
