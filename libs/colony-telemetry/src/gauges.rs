//! Gauges set from periodic readings of a table, one series per label set found.

use std::collections::{HashMap, HashSet};

/// A gauge's name and its label pairs.
pub type GaugeKey = (&'static str, Vec<(&'static str, String)>);

/// Sets gauges from one reading, and sets to 0 the label sets an earlier reading had that this
/// one has not (a tenant whose queue drained), so a vanished series reads 0 rather than its
/// last value.
#[derive(Debug, Default)]
pub struct GaugeSet {
    written: HashSet<GaugeKey>,
}

impl GaugeSet {
    /// Sets every gauge of `values`, and 0 on those written before and missing now.
    pub fn record(&mut self, mut values: HashMap<GaugeKey, f64>) {
        for key in self.written.drain() {
            values.entry(key).or_insert(0.0);
        }
        for ((name, labels), value) in values {
            let pairs: Vec<::metrics::Label> = labels
                .iter()
                .map(|(key, value)| ::metrics::Label::new(*key, value.clone()))
                .collect();
            ::metrics::gauge!(name, pairs).set(value);
            if value != 0.0 {
                self.written.insert((name, labels));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use metrics_exporter_prometheus::PrometheusBuilder;

    use super::GaugeSet;

    #[test]
    fn a_label_set_missing_from_the_next_reading_reads_zero() {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let mut gauges = GaugeSet::default();
        let reading = |tenants: &[(&str, f64)]| {
            tenants
                .iter()
                .map(|(tenant, value)| (("queued", vec![("tenant", (*tenant).to_owned())]), *value))
                .collect::<HashMap<_, _>>()
        };
        metrics::with_local_recorder(&recorder, || {
            gauges.record(reading(&[("acme", 3.0), ("globex", 5.0)]));
            gauges.record(reading(&[("globex", 4.0)]));
        });
        let text = handle.render();
        assert!(text.contains("queued{tenant=\"acme\"} 0\n"), "{text}");
        assert!(text.contains("queued{tenant=\"globex\"} 4\n"), "{text}");
    }
}
