//! What the daemon did and holds, as one `prometheus-client` registry: the SCP, the
//! stabilizer and both job pipelines count into it as things happen, and the admin
//! endpoint sets the figures only a scrape can know (batches, jobs, free spool space)
//! just before it encodes the registry. docs/pipelines.md lists every metric.
//!
//! The exposition is OpenMetrics text ([`CONTENT_TYPE`]), which Prometheus reads like its
//! older text format; counters keep their `_total` names.

use std::sync::{Mutex, PoisonError};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::gateway::jobs::Cause;
use crate::gateway::reception::route::Refusal;

/// Content type of [`Metrics::render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Label pairs of a series (`[("pipeline", "outbound"), ("step", "upload")]`).
type Labels = Vec<(&'static str, String)>;

/// A labelled family of counters or gauges.
type Labelled<M> = Family<Labels, M>;

fn labels(pairs: &[(&'static str, &str)]) -> Labels {
    pairs.iter().map(|&(k, v)| (k, v.to_owned())).collect()
}

/// The figures known only at scrape time, read by the admin endpoint.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Batches in the index by state (`open`, `stable`, `sent`).
    pub batches: Vec<(&'static str, u64)>,
    /// Jobs by pipeline (`outbound`, `inbound`) and state (a step, `done` or `failed`).
    pub jobs: Vec<(String, String, u64)>,
    /// Jobs by pipeline waiting for their back-off after a failed attempt.
    pub retry_queue: Vec<(String, u64)>,
    /// Jobs by pipeline held until `cloudpdi retry` (a failure only a person can fix).
    pub held: Vec<(String, u64)>,
    /// Bytes free for the daemon on the spool's file system (`None`: not readable).
    pub spool_free_bytes: Option<u64>,
    /// The floor `spool.min_free_mb` in bytes, below which the SCP refuses instances.
    pub spool_min_free_bytes: u64,
}

/// The registry and every metric in it. The counters are public so the code that sees
/// an event counts it where it happens.
#[derive(Debug)]
pub struct Metrics {
    /// Associations accepted.
    pub associations_accepted: Counter,
    /// Associations currently open.
    pub associations_active: Gauge,
    /// Associations rejected because no route has the called AE title.
    pub rejected_unknown_called: Counter,
    /// Associations rejected because the calling AE title is not allowed.
    pub rejected_caller_not_allowed: Counter,
    /// Instances stored durably (new or replacing one in an open batch).
    pub instances_stored: Counter,
    /// Instances acknowledged without storing: already in a stable batch.
    pub instances_duplicate: Counter,
    /// Instances refused because the dataset could not be parsed or did not match.
    pub instances_unparsable: Counter,
    /// Instances refused for lack of disk space.
    pub instances_out_of_space: Counter,
    /// Instances refused for any other local failure.
    pub instances_failed: Counter,
    /// Bytes of stored Part 10 files.
    pub bytes_stored: Counter,
    /// Batches that became stable.
    pub batches_stable: Counter,
    /// Tokens issued by the outbound pipeline (its `issue` step done).
    pub tokens_issued: Counter,
    /// Studies C-STOREd into the local PACS by the inbound pipeline (its `import` step
    /// done).
    pub imports: Counter,
    /// Instances the local PACS refused for good, set aside by an import.
    pub instances_set_aside: Counter,
    job_failures: Labelled<Counter>,
    last_success: Labelled<Gauge>,
    batches: Labelled<Gauge>,
    jobs: Labelled<Gauge>,
    retry_queue: Labelled<Gauge>,
    held: Labelled<Gauge>,
    spool_free_bytes: Gauge,
    spool_min_free_bytes: Gauge,
    registry: Registry,
    /// One scrape at a time sets the scrape-time figures and encodes them.
    scrape: Mutex<()>,
}

impl Default for Metrics {
    fn default() -> Metrics {
        let mut registry = Registry::with_prefix("cloudpdi");
        let rejected = Labelled::<Counter>::default();
        let reason = |r: &str| rejected.get_or_create_owned(&labels(&[("reason", r)]));
        let instances = Labelled::<Counter>::default();
        let outcome = |o: &str| instances.get_or_create_owned(&labels(&[("outcome", o)]));
        let metrics = Metrics {
            associations_accepted: Counter::default(),
            associations_active: Gauge::default(),
            rejected_unknown_called: reason("unknown_called_ae"),
            rejected_caller_not_allowed: reason("caller_not_allowed"),
            instances_stored: outcome("stored"),
            instances_duplicate: outcome("duplicate"),
            instances_unparsable: outcome("unparsable"),
            instances_out_of_space: outcome("out_of_space"),
            instances_failed: outcome("failed"),
            bytes_stored: Counter::default(),
            batches_stable: Counter::default(),
            tokens_issued: Counter::default(),
            imports: Counter::default(),
            instances_set_aside: Counter::default(),
            job_failures: Labelled::default(),
            last_success: Labelled::default(),
            batches: Labelled::default(),
            jobs: Labelled::default(),
            retry_queue: Labelled::default(),
            held: Labelled::default(),
            spool_free_bytes: Gauge::default(),
            spool_min_free_bytes: Gauge::default(),
            registry: Registry::default(),
            scrape: Mutex::new(()),
        };
        let m = &metrics;
        let r = &mut registry;
        r.register(
            "associations_accepted",
            "DICOM associations accepted",
            m.associations_accepted.clone(),
        );
        r.register(
            "associations_active",
            "DICOM associations open now",
            m.associations_active.clone(),
        );
        r.register(
            "associations_rejected",
            "DICOM associations rejected, by reason",
            rejected,
        );
        r.register("instances", "C-STORE requests by outcome", instances);
        r.register(
            "stored_bytes",
            "Bytes of DICOM files written to the spool",
            m.bytes_stored.clone(),
        );
        r.register(
            "batches_stable",
            "Batches that became stable",
            m.batches_stable.clone(),
        );
        r.register(
            "batches",
            "Batches in the spool index, by state (open: receiving, stable: waiting for \
             the outbound pipeline, sent: taken by it)",
            m.batches.clone(),
        );
        r.register(
            "jobs",
            "Jobs by pipeline and state (the step a job is at, done or failed)",
            m.jobs.clone(),
        );
        r.register(
            "jobs_retry_queue",
            "Jobs waiting for their back-off after a failed attempt, by pipeline",
            m.retry_queue.clone(),
        );
        r.register(
            "jobs_held",
            "Jobs held until `cloudpdi retry` after a failure only a person can fix \
             (e.g. the PACS rejects our AE title), by pipeline",
            m.held.clone(),
        );
        r.register(
            "job_failures",
            "Failed attempts of a job step, by pipeline, step and cause (retried ones \
             included)",
            m.job_failures.clone(),
        );
        r.register(
            "tokens_issued",
            "Tokens issued by the outbound pipeline",
            m.tokens_issued.clone(),
        );
        r.register(
            "imports",
            "Studies imported into the local PACS by the inbound pipeline",
            m.imports.clone(),
        );
        r.register(
            "instances_set_aside",
            "Instances the local PACS refused for good, set aside by an import",
            m.instances_set_aside.clone(),
        );
        r.register(
            "last_success_timestamp_seconds",
            "When a job of the pipeline last finished (Unix seconds)",
            m.last_success.clone(),
        );
        r.register(
            "spool_free_bytes",
            "Bytes free for the daemon on the spool's file system",
            m.spool_free_bytes.clone(),
        );
        r.register(
            "spool_min_free_bytes",
            "The floor spool.min_free_mb in bytes: below it the SCP refuses instances",
            m.spool_min_free_bytes.clone(),
        );
        Metrics {
            registry,
            ..metrics
        }
    }
}

/// A count for a gauge (they hold `i64`).
fn gauge_value(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Metrics {
    /// Counts a refused association by reason.
    pub fn refused(&self, refusal: Refusal) {
        match refusal {
            Refusal::UnknownCalledAe => &self.rejected_unknown_called,
            Refusal::CallerNotAllowed => &self.rejected_caller_not_allowed,
        }
        .inc();
    }

    /// Counts a failed attempt of `step` of a `pipeline` job, by its cause.
    pub fn job_failed(&self, pipeline: &str, step: &str, cause: Cause) {
        self.job_failures
            .get_or_create(&labels(&[
                ("pipeline", pipeline),
                ("step", step),
                ("cause", cause.label()),
            ]))
            .inc();
    }

    /// Records that a `pipeline` job has just finished.
    pub fn job_finished(&self, pipeline: &str) {
        self.last_success_at(pipeline, crate::clock::now_seconds());
    }

    /// Sets when a `pipeline` job last finished (Unix seconds): at start, from the
    /// records ([`crate::gateway::jobs::last_success`]).
    pub fn last_success_at(&self, pipeline: &str, unix_seconds: u64) {
        self.last_success
            .get_or_create(&labels(&[("pipeline", pipeline)]))
            .set(gauge_value(unix_seconds));
    }

    /// Sets the scrape-time figures from `now` and renders every metric as OpenMetrics
    /// text ([`CONTENT_TYPE`]).
    pub fn render(&self, now: &Snapshot) -> String {
        let _one_scrape = self.scrape.lock().unwrap_or_else(PoisonError::into_inner);
        self.batches.clear();
        for (state, count) in &now.batches {
            self.batches
                .get_or_create(&labels(&[("state", state)]))
                .set(gauge_value(*count));
        }
        self.jobs.clear();
        for (pipeline, state, count) in &now.jobs {
            self.jobs
                .get_or_create(&labels(&[("pipeline", pipeline), ("state", state)]))
                .set(gauge_value(*count));
        }
        for (family, figures) in [
            (&self.retry_queue, &now.retry_queue),
            (&self.held, &now.held),
        ] {
            family.clear();
            for (pipeline, count) in figures {
                family
                    .get_or_create(&labels(&[("pipeline", pipeline)]))
                    .set(gauge_value(*count));
            }
        }
        self.spool_free_bytes
            .set(now.spool_free_bytes.map_or(-1, gauge_value));
        self.spool_min_free_bytes
            .set(gauge_value(now.spool_min_free_bytes));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_gauges_and_job_figures_with_labels() {
        let metrics = Metrics::default();
        metrics.instances_stored.inc();
        metrics.refused(Refusal::CallerNotAllowed);
        metrics.job_failed("outbound", "upload", Cause::RepositoryUnreachable);
        metrics.job_failed("outbound", "upload", Cause::RepositoryUnreachable);
        metrics.job_failed("inbound", "import", Cause::PacsRejected);
        metrics.tokens_issued.inc();
        metrics.job_finished("inbound");
        let text = metrics.render(&Snapshot {
            batches: vec![("open", 3), ("stable", 0)],
            jobs: vec![("outbound".into(), "failed".into(), 2)],
            retry_queue: vec![("outbound".into(), 1)],
            held: vec![("inbound".into(), 1)],
            spool_free_bytes: Some(1 << 30),
            spool_min_free_bytes: 1 << 20,
        });
        for line in [
            "cloudpdi_instances_total{outcome=\"stored\"} 1\n",
            "cloudpdi_instances_total{outcome=\"failed\"} 0\n",
            "cloudpdi_associations_rejected_total{reason=\"caller_not_allowed\"} 1\n",
            "cloudpdi_associations_accepted_total 0\n",
            "# TYPE cloudpdi_batches gauge\n",
            "cloudpdi_batches{state=\"open\"} 3\n",
            "cloudpdi_batches{state=\"stable\"} 0\n",
            "cloudpdi_jobs{pipeline=\"outbound\",state=\"failed\"} 2\n",
            "cloudpdi_job_failures_total{pipeline=\"outbound\",step=\"upload\",cause=\"repository_unreachable\"} 2\n",
            "cloudpdi_job_failures_total{pipeline=\"inbound\",step=\"import\",cause=\"pacs_rejected\"} 1\n",
            "cloudpdi_jobs_retry_queue{pipeline=\"outbound\"} 1\n",
            "cloudpdi_jobs_held{pipeline=\"inbound\"} 1\n",
            "cloudpdi_spool_min_free_bytes 1048576\n",
            "cloudpdi_tokens_issued_total 1\n",
            "cloudpdi_imports_total 0\n",
            "cloudpdi_spool_free_bytes 1073741824\n",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
        let last = text
            .lines()
            .find_map(|l| {
                l.strip_prefix("cloudpdi_last_success_timestamp_seconds{pipeline=\"inbound\"} ")
            })
            .and_then(|v| v.parse::<u64>().ok())
            .expect("last success of inbound");
        assert!(last.abs_diff(crate::clock::now_seconds()) < 60, "{last}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn a_state_no_longer_present_leaves_the_jobs_gauge() {
        let metrics = Metrics::default();
        let first = Snapshot {
            jobs: vec![("inbound".into(), "import".into(), 1)],
            ..Snapshot::default()
        };
        assert!(metrics.render(&first).contains("state=\"import\"} 1\n"));
        let text = metrics.render(&Snapshot::default());
        assert!(!text.contains("state=\"import\""), "{text}");
        assert!(text.contains("cloudpdi_spool_free_bytes -1\n"), "{text}");
    }
}
