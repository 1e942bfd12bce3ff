//! Retention of records: the database forgets what finished cleanly long ago.
//!
//! Every job and batch used to be kept for ever, so the database, `cloudpdi status` and
//! every scan of the records grew with each study. Once an hour (and at start) the
//! records of jobs that succeeded and last changed more than `spool.records_days` ago are
//! removed, with the batch each outbound job sent. What a person may still need is never
//! removed automatically: failed jobs, jobs set aside after crashes, inbound jobs with
//! instances the PACS refused, outbound jobs whose spooled instances are still kept,
//! outbound jobs whose token can still download (not revoked, not expired: an extended
//! token must stay revocable), and inbound jobs whose token has not expired (a pruned
//! record must not let the same token be imported twice).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::clock::now_ms;
use crate::gateway::inbound::InboundJob;
use crate::gateway::outbound::OutboundJob;
use crate::gateway::store::{BatchIndex, IndexError, JobStore};

/// Time between two passes of the retention of records: old records are few per hour,
/// and a pass reads every job record once.
pub const PRUNE_EVERY: Duration = Duration::from_secs(3_600);

/// The records the retention looks after and how long finished ones are kept.
#[derive(Clone)]
pub struct Retention {
    /// The batches, forgotten with their outbound job.
    pub batches: BatchIndex,
    /// The outbound job records.
    pub outbound: JobStore,
    /// The inbound job records, when the inbound pipeline runs.
    pub inbound: Option<JobStore>,
    /// How long a finished record is kept (`spool.records_days`); zero keeps every
    /// record for ever.
    pub keep: Duration,
}

/// What one pass removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Job records of both pipelines.
    pub jobs: usize,
    /// Batch records.
    pub batches: usize,
}

impl Retention {
    /// Removes the records that finished cleanly before `now - keep` (Unix milliseconds);
    /// blocking. A batch is removed before its job, so a crash in between leaves a job
    /// record that the next pass removes, never a batch without its job.
    ///
    /// # Errors
    /// [`IndexError`] when the database cannot be read or changed.
    pub fn prune(&self, now: u64) -> Result<Pruned, IndexError> {
        let mut pruned = Pruned::default();
        if self.keep.is_zero() {
            return Ok(pruned);
        }
        let keep = u64::try_from(self.keep.as_millis()).unwrap_or(u64::MAX);
        let cutoff = now.saturating_sub(keep);
        for job in self.outbound.prunable::<OutboundJob>(cutoff, now)? {
            if let Some(batch) = job.batch {
                if self.batches.forget(batch)? {
                    pruned.batches += 1;
                }
            }
            if self.outbound.remove::<OutboundJob>(&job.id)? {
                pruned.jobs += 1;
            }
        }
        if let Some(inbound) = &self.inbound {
            for job in inbound.prunable::<InboundJob>(cutoff, now)? {
                if inbound.remove::<InboundJob>(&job.id)? {
                    pruned.jobs += 1;
                }
            }
        }
        Ok(pruned)
    }

    /// Prunes at start and then every [`PRUNE_EVERY`] until `cancel`; a failed pass is
    /// logged and tried again at the next.
    pub async fn run(self, cancel: CancellationToken) {
        if self.keep.is_zero() {
            return;
        }
        let this = Arc::new(self);
        let mut tick = tokio::time::interval(PRUNE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = cancel.cancelled() => return,
            }
            let pass = this.clone();
            match tokio::task::spawn_blocking(move || pass.prune(now_ms())).await {
                Ok(Ok(Pruned {
                    jobs: 0,
                    batches: 0,
                })) => {}
                Ok(Ok(pruned)) => info!(
                    jobs = pruned.jobs,
                    batches = pruned.batches,
                    days = this.keep.as_secs() / 86_400,
                    "finished records older than spool.records_days removed"
                ),
                Ok(Err(e)) => error!("cannot remove old finished records (will retry): {e}"),
                Err(e) => error!("cannot remove old finished records (will retry): {e}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    use crate::config::RouteConfig;
    use crate::gateway::inbound::{InStep, SetAside};
    use crate::gateway::jobs::Progress;
    use crate::gateway::outbound::OutStep;
    use crate::gateway::reception::batch::{BatchId, InstanceRecord};
    use crate::gateway::reception::route::Routes;
    use crate::gateway::store::BatchCounts;

    const DAY: u64 = 86_400_000;
    const NOW: u64 = 400 * DAY;

    fn progress(updated_at: u64) -> Progress {
        Progress {
            created_at: updated_at,
            updated_at,
            ..Progress::default()
        }
    }

    fn outbound(batch: BatchId, step: OutStep, age_days: u64, spool_removed: bool) -> OutboundJob {
        OutboundJob {
            id: batch.to_string(),
            batch: Some(batch),
            route: "ct".into(),
            step,
            progress: progress(NOW - age_days * DAY),
            instances: 1,
            excluded: 0,
            container_bytes: 1,
            expires_at: 0,
            document_id: Some("D".into()),
            token_file: None,
            slip_file: None,
            spool_removed,
            failed_at: None,
            repository: None,
            study: None,
            deliveries: Vec::new(),
            revoked_at: None,
            printed: None,
        }
    }

    fn inbound(id: &str, step: InStep, expires_days: u64, set_aside: usize) -> InboundJob {
        InboundJob {
            id: id.into(),
            issuer: "A".into(),
            document_id: "D".into(),
            expires_at: u32::try_from(expires_days * DAY / 1000).expect("small"),
            local_patient_id: None,
            step,
            progress: progress(NOW - 100 * DAY),
            instances: 1,
            stored: 1,
            set_aside: (0..set_aside)
                .map(|_| SetAside {
                    sop_instance_uid: "1.2.3".into(),
                    file: "set-aside/1.dcm".into(),
                    reason: "refused by the PACS".into(),
                })
                .collect(),
            study: None,
            sealed_from: None,
            committed: 0,
            uncommitted: Vec::new(),
        }
    }

    /// A batch taken by the outbound pipeline, as reception and the pipeline leave it.
    fn sent_batch(index: &BatchIndex, routes: &Routes, study: &str) -> BatchId {
        let route = routes.by_name("ct").expect("route");
        let record = InstanceRecord {
            batch: BatchId(0),
            file: "f".into(),
            size: 1,
            sop_class_uid: "1.2".into(),
            study_uid: study.into(),
            series_uid: "1.2.3.4".into(),
            transfer_syntax: "1.2.840.10008.1.2.1".into(),
            calling_ae: "PACS".into(),
            received_at: 1,
            patient_id: String::new(),
            accession: String::new(),
            study_date: String::new(),
            modality: String::new(),
            hash: None,
        };
        let uid = format!("{study}.1");
        index.record(route, study, &uid, record).expect("record");
        let sealed = index.seal_quiet(routes, NOW, 0).expect("seal");
        let id = sealed[0].id;
        index.claim(id).expect("claim").expect("claimed");
        id
    }

    #[test]
    fn old_finished_records_go_newer_failed_and_set_aside_ones_stay() {
        let dir = tempfile::tempdir().expect("tempdir");
        let index = BatchIndex::open(dir.path()).expect("index");
        let out = JobStore::open(index.store(), "outbound_jobs").expect("outbound");
        let inb = JobStore::open(index.store(), "inbound_jobs").expect("inbound");
        let mut config = BTreeMap::new();
        config.insert("ct".to_owned(), RouteConfig::default());
        let routes = Routes::new(&config);

        let old_done = sent_batch(&index, &routes, "1.1");
        let new_done = sent_batch(&index, &routes, "1.2");
        let old_failed = sent_batch(&index, &routes, "1.3");
        let old_kept_spool = sent_batch(&index, &routes, "1.4");
        out.put(&outbound(old_done, OutStep::Done, 91, true))
            .expect("put");
        out.put(&outbound(new_done, OutStep::Done, 89, true))
            .expect("put");
        out.put(&outbound(old_failed, OutStep::Failed, 200, false))
            .expect("put");
        out.put(&outbound(old_kept_spool, OutStep::Done, 200, false))
            .expect("put");
        inb.put(&inbound("Rdone", InStep::Done, 300, 0))
            .expect("put");
        inb.put(&inbound("Rfailed", InStep::Failed, 300, 0))
            .expect("put");
        inb.put(&inbound("Raside", InStep::Done, 300, 1))
            .expect("put");
        inb.put(&inbound("Rvalid", InStep::Done, 500, 0))
            .expect("put");
        let counts = index.counts().expect("counts");
        assert_eq!(
            counts,
            BatchCounts {
                open: 0,
                stable: 0,
                sent: 4
            }
        );

        let retention = Retention {
            batches: index.clone(),
            outbound: out.clone(),
            inbound: Some(inb.clone()),
            keep: Duration::from_secs(90 * 86_400),
        };
        let pruned = retention.prune(NOW).expect("prune");
        assert_eq!(
            pruned,
            Pruned {
                jobs: 2,
                batches: 1
            }
        );
        let out_ids = || -> Vec<String> {
            let jobs = out.all::<OutboundJob>().expect("outbound jobs");
            jobs.into_iter().map(|j| j.id).collect()
        };
        let in_ids = || -> Vec<String> {
            let jobs = inb.all::<InboundJob>().expect("inbound jobs");
            jobs.into_iter().map(|j| j.id).collect()
        };
        let kept = [new_done, old_failed, old_kept_spool].map(|b| b.to_string());
        assert_eq!(out_ids(), kept);
        assert_eq!(in_ids(), ["Raside", "Rfailed", "Rvalid"]);
        assert!(index.batch(old_done).expect("read").is_none());
        for kept in [new_done, old_failed, old_kept_spool] {
            assert!(index.batch(kept).expect("read").is_some(), "{kept}");
        }
        assert_eq!(index.counts().expect("counts").sent, 3);
        assert_eq!(retention.prune(NOW).expect("again"), Pruned::default());

        // Zero keeps every record for ever.
        let forever = Retention {
            keep: Duration::ZERO,
            ..retention
        };
        assert_eq!(
            forever.prune(NOW + 1000 * DAY).expect("zero"),
            Pruned::default()
        );
        assert_eq!(out_ids().len(), 3);
    }
}
