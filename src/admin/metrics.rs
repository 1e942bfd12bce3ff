//! Counters of what the daemon did, shared by the SCP and the admin endpoint so that the
//! Prometheus figures and the log lines come from the same events.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::gateway::reception::route::Refusal;

/// Process-wide counters (monotonic unless named `active`).
#[derive(Debug, Default)]
pub struct Metrics {
    /// Associations accepted.
    pub associations_accepted: AtomicU64,
    /// Associations currently open.
    pub associations_active: AtomicU64,
    /// Associations rejected because no route has the called AE title.
    pub rejected_unknown_called: AtomicU64,
    /// Associations rejected because the calling AE title is not allowed.
    pub rejected_caller_not_allowed: AtomicU64,
    /// Instances stored durably (new or replacing one in an open batch).
    pub instances_stored: AtomicU64,
    /// Instances acknowledged without storing: already in a stable batch.
    pub instances_duplicate: AtomicU64,
    /// Instances refused because the dataset could not be parsed or did not match.
    pub instances_unparsable: AtomicU64,
    /// Instances refused for lack of disk space.
    pub instances_out_of_space: AtomicU64,
    /// Instances refused for any other local failure.
    pub instances_failed: AtomicU64,
    /// Bytes of stored Part 10 files.
    pub bytes_stored: AtomicU64,
    /// Batches that became stable.
    pub batches_stable: AtomicU64,
}

/// Adds one to a counter.
pub fn inc(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl Metrics {
    /// Counts a refused association by reason.
    pub fn refused(&self, refusal: Refusal) {
        inc(match refusal {
            Refusal::UnknownCalledAe => &self.rejected_unknown_called,
            Refusal::CallerNotAllowed => &self.rejected_caller_not_allowed,
        });
    }

    /// Renders the Prometheus text exposition format; `gauges` are values computed at
    /// scrape time (e.g. batches by state) as (name, help, value).
    pub fn render(&self, gauges: &[(&str, &str, u64)]) -> String {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, u64)]| {
            let _ = writeln!(out, "# HELP cloudpdi_{name} {help}");
            let _ = writeln!(out, "# TYPE cloudpdi_{name} {kind}");
            for (labels, value) in samples {
                let _ = writeln!(out, "cloudpdi_{name}{labels} {value}");
            }
        };
        metric(
            "associations_accepted_total",
            "counter",
            "DICOM associations accepted.",
            &[("", get(&self.associations_accepted))],
        );
        metric(
            "associations_active",
            "gauge",
            "DICOM associations open now.",
            &[("", get(&self.associations_active))],
        );
        metric(
            "associations_rejected_total",
            "counter",
            "DICOM associations rejected, by reason.",
            &[
                (
                    "{reason=\"unknown_called_ae\"}",
                    get(&self.rejected_unknown_called),
                ),
                (
                    "{reason=\"caller_not_allowed\"}",
                    get(&self.rejected_caller_not_allowed),
                ),
            ],
        );
        metric(
            "instances_total",
            "counter",
            "C-STORE requests by outcome.",
            &[
                ("{outcome=\"stored\"}", get(&self.instances_stored)),
                ("{outcome=\"duplicate\"}", get(&self.instances_duplicate)),
                ("{outcome=\"unparsable\"}", get(&self.instances_unparsable)),
                (
                    "{outcome=\"out_of_space\"}",
                    get(&self.instances_out_of_space),
                ),
                ("{outcome=\"failed\"}", get(&self.instances_failed)),
            ],
        );
        metric(
            "stored_bytes_total",
            "counter",
            "Bytes of DICOM files written to the spool.",
            &[("", get(&self.bytes_stored))],
        );
        metric(
            "batches_stable_total",
            "counter",
            "Batches that became stable.",
            &[("", get(&self.batches_stable))],
        );
        for (name, help, value) in gauges {
            metric(name, "gauge", help, &[("", *value)]);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_with_labels() {
        let metrics = Metrics::default();
        inc(&metrics.instances_stored);
        metrics.refused(Refusal::CallerNotAllowed);
        let text = metrics.render(&[("batches_open", "Open batches.", 3)]);
        assert!(text.contains("cloudpdi_instances_total{outcome=\"stored\"} 1\n"));
        assert!(
            text.contains(
                "cloudpdi_associations_rejected_total{reason=\"caller_not_allowed\"} 1\n"
            )
        );
        assert!(text.contains("# TYPE cloudpdi_batches_open gauge\ncloudpdi_batches_open 3\n"));
    }
}
