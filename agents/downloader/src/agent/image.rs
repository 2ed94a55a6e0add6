//! The agent's side of container images (`crate::registry` does the protocol): one job per
//! content tree of format CONTAINER, retried with the same doubling delay as downloads; once
//! pulled, the tree holds exactly its image's blobs (an older image's layers no other tree
//! holds are removed) and is reported LOADED with the manifest digest as its sha256.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use cairn_types::{ContentTreeConfig, ContentTreeState, ContentTreeStatus, ErrorDescription};
use chrono::Utc;
use tokio::sync::{mpsc, watch};
use uuid::Uuid;

use super::{AgentError, Downloader, Job, JobEvent, Settings};
use crate::fetch::Progress;
use crate::registry::{self, ImageSource, Pulled};
use crate::store::ContentStore;

/// What an image job tells the agent.
#[derive(Debug)]
pub(super) enum ImageEvent {
    Progress(Progress),
    Failed { error: String, retry_in: Duration },
    Loaded(Pulled),
}

fn job_key(tree: Uuid) -> String {
    format!("image:{tree}")
}

impl Downloader {
    /// The status an image tree starts from: its published one while it names the same image
    /// (a tag pull's resolved digest kept), with the config's fields.
    fn image_status(&self, config: &ContentTreeConfig) -> ContentTreeStatus {
        let mut status = self
            .statuses
            .get(&config.content_id.to_string())
            .unwrap_or_default();
        let same = status.relative_url == config.relative_url
            && (config.content_sha256.is_empty() || status.content_sha256 == config.content_sha256);
        if !same {
            status = ContentTreeStatus::default();
        }
        status.content_id = config.content_id;
        status.display_name = config.display_name.clone();
        status.relative_url = config.relative_url.clone();
        status.format = config.format;
        status.max_download_size = config.max_download_size;
        status.generation_counter = config.generation_counter;
        if status.content_sha256.is_empty() {
            status.content_sha256 = config.content_sha256.clone();
        }
        status
    }

    pub(super) async fn handle_image_config(
        &mut self,
        config: ContentTreeConfig,
    ) -> Result<(), AgentError> {
        let id = config.content_id;
        let mut status = self.image_status(&config);
        let source = match registry::source(&config) {
            Ok(source) => source,
            Err(reason) => {
                tracing::warn!(tree = %id, "{reason}");
                self.stop_image_job(id).await;
                self.release(id).await?;
                status.state = ContentTreeState::Initial;
                status.error = Self::error(&config, &reason);
                return Ok(self.statuses.publish(status).await?);
            }
        };
        self.held.insert(id);
        // Loaded before (this start or an earlier one) and every blob still there: nothing to
        // pull. Checked on the blocking pool.
        let blobs = status.blobs.clone();
        let content = self.content.clone();
        let complete = status.state == ContentTreeState::Loaded
            && !blobs.is_empty()
            && tokio::task::spawn_blocking(move || {
                blobs.iter().all(|b| content.join("blobs").join(b).exists())
            })
            .await?;
        if complete {
            tracing::info!(tree = %id, sha256 = %status.content_sha256, "image already in the store");
            self.stop_image_job(id).await;
            return Ok(self.statuses.publish(status).await?);
        }
        let origin = super::job_origin(&config);
        let current = self
            .jobs
            .get(&job_key(id))
            .is_some_and(|job| !job.handle.is_finished() && job.origin == origin);
        if !current {
            self.stop_image_job(id).await;
            tracing::info!(tree = %id, image = ?source, "pulling");
            let handle = tokio::spawn(image_job(
                id,
                source,
                self.store.clone(),
                self.content.clone(),
                self.settings.subscribe(),
                self.events.clone(),
            ));
            self.jobs.insert(
                job_key(id),
                Job {
                    handle,
                    owner: id,
                    origin,
                },
            );
        }
        if status.state == ContentTreeState::Loaded {
            status.state = ContentTreeState::Initial;
            status.progress = 0;
        }
        Ok(self.statuses.publish(status).await?)
    }

    pub(super) async fn stop_image_job(&mut self, tree: Uuid) {
        if let Some(job) = self.jobs.remove(&job_key(tree)) {
            job.handle.abort();
            let _ = job.handle.await;
        }
    }

    pub(super) async fn handle_image_event(
        &mut self,
        tree: Uuid,
        event: ImageEvent,
    ) -> Result<(), AgentError> {
        let Some(config) = self.configs.get(&tree).cloned() else {
            return Ok(());
        };
        if !self.held.contains(&tree) {
            return Ok(());
        }
        let mut status = self.image_status(&config);
        match event {
            ImageEvent::Progress(progress) => {
                status.state = ContentTreeState::Downloading;
                status.current_size = progress.current as i64;
                status.total_size = progress.total.map_or(0, |t| t as i64);
                status.progress = match progress.total {
                    Some(t) if t > 0 => (progress.current.min(t) * 100 / t) as u32,
                    _ => 0,
                };
            }
            ImageEvent::Failed { error, retry_in } => {
                status.error = Self::error(&config, &error);
                status.error.error_retry_condition =
                    format!("will retry in {}s", retry_in.as_secs_f64().ceil());
                tracing::warn!(tree = %tree, retry_in = ?retry_in, "pull failed: {error}");
            }
            ImageEvent::Loaded(pulled) => {
                self.jobs.remove(&job_key(tree));
                let blobs = pulled.blobs.clone();
                let released = match self
                    .blocking(move |store| store.hold_exactly(tree, &blobs))
                    .await?
                {
                    Ok(released) => released,
                    Err(e) => {
                        tracing::error!(tree = %tree, "{e}; collected at the next start");
                        Vec::new()
                    }
                };
                for sha in released {
                    self.drop_content(&sha).await;
                }
                status.state = ContentTreeState::Loaded;
                status.content_sha256 = pulled.manifest_sha.clone();
                status.file_location = self
                    .content
                    .join("blobs")
                    .join(&pulled.manifest_sha)
                    .display()
                    .to_string();
                status.blobs = pulled.blobs;
                status.total_size = pulled.size as i64;
                status.current_size = pulled.size as i64;
                status.progress = 100;
                status.create_time = Some(Utc::now());
                status.error = ErrorDescription::default();
                tracing::info!(tree = %tree, sha256 = %pulled.manifest_sha, blobs = status.blobs.len(), "image pulled, verified and loaded");
            }
        }
        Ok(self.statuses.publish(status).await?)
    }
}

/// Pulls one image, retrying until it is in the store or the job is aborted.
async fn image_job(
    tree: Uuid,
    source: ImageSource,
    store: Arc<Mutex<ContentStore>>,
    content: std::path::PathBuf,
    settings: watch::Receiver<Settings>,
    events: mpsc::Sender<JobEvent>,
) {
    loop {
        let now = *settings.borrow();
        let progress_events = events.clone();
        let pulled = registry::pull(tree, &source, &store, &content, now.stall, move |p| {
            // A full channel drops a progress report; the next one says more anyway.
            let _ = progress_events.try_send(JobEvent::Image {
                tree,
                event: ImageEvent::Progress(p),
            });
        })
        .await;
        let error = match pulled {
            Ok(pulled) => {
                let _ = events
                    .send(JobEvent::Image {
                        tree,
                        event: ImageEvent::Loaded(pulled),
                    })
                    .await;
                return;
            }
            Err(error) => error,
        };
        // EVE's `timer.download.retry`, the same wait each time, as for HTTP trees.
        let delay = now.retry;
        let failed = JobEvent::Image {
            tree,
            event: ImageEvent::Failed {
                error,
                retry_in: delay,
            },
        };
        if events.send(failed).await.is_err() {
            return;
        }
        tokio::time::sleep(delay).await;
    }
}
