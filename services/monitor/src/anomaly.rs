//! Anomalies in per-model latency and cost: for each deployment and signal, an exponentially
//! weighted mean and variance of the calls seen so far, and a z-score threshold. A call whose
//! value stands more than `z_threshold` deviations from its deployment's mean is an anomaly; the
//! baseline keeps learning from every call, so a lasting change stops being one.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, PoisonError};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Anomalies kept for the status API, newest last.
const RECENT: usize = 50;

/// `anomaly.*`: how the detector weighs and judges.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AnomalyConfig {
    /// Weight of the newest call in the moving mean and variance (0 < alpha < 1): 0.1 is
    /// roughly the last 20 calls.
    pub alpha: f64,
    /// Deviations from the mean beyond which a call is an anomaly.
    pub z_threshold: f64,
    /// Calls of a deployment seen before it is judged at all.
    pub warmup: u32,
    /// The smallest deviation assumed, as a share of the mean: a series that has been
    /// perfectly steady is not alarmed by a few percent of jitter.
    pub min_deviation_share: f64,
}

impl Default for AnomalyConfig {
    fn default() -> Self {
        Self {
            alpha: 0.1,
            z_threshold: 4.0,
            warmup: 20,
            min_deviation_share: 0.05,
        }
    }
}

impl AnomalyConfig {
    pub fn validate(&self, problems: &mut Vec<String>) {
        if !(self.alpha > 0.0 && self.alpha < 1.0) {
            problems.push("anomaly.alpha: must be between 0 and 1 (exclusive)".into());
        }
        if !(self.z_threshold.is_finite() && self.z_threshold > 0.0) {
            problems.push("anomaly.z_threshold: must be a number above 0".into());
        }
        if !(self.min_deviation_share.is_finite() && self.min_deviation_share >= 0.0) {
            problems.push("anomaly.min_deviation_share: must be a number >= 0".into());
        }
    }
}

/// What is watched per deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Signal {
    /// A call's latency, in milliseconds.
    LatencyMs,
    /// A call's cost, in millionths of a US dollar.
    CostMicrosUsd,
}

impl Signal {
    pub fn as_str(self) -> &'static str {
        match self {
            Signal::LatencyMs => "latency_ms",
            Signal::CostMicrosUsd => "cost_micros_usd",
        }
    }
}

/// An exponentially weighted mean and variance.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Ewma {
    mean: f64,
    variance: f64,
    seen: u32,
}

impl Ewma {
    /// Takes `value` in; returns its z-score against the series before it, once `warmup`
    /// values were seen.
    fn observe(&mut self, value: f64, config: &AnomalyConfig) -> Option<f64> {
        if self.seen == 0 {
            self.mean = value;
            self.seen = 1;
            return None;
        }
        let deviation = self
            .variance
            .sqrt()
            .max(self.mean.abs() * config.min_deviation_share)
            .max(f64::MIN_POSITIVE);
        let difference = value - self.mean;
        let z = (self.seen >= config.warmup).then_some(difference / deviation);
        let step = config.alpha * difference;
        self.mean += step;
        self.variance = (1.0 - config.alpha) * (self.variance + difference * step);
        self.seen = self.seen.saturating_add(1);
        z
    }
}

/// A call that stood out.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Anomaly {
    pub deployment: String,
    pub signal: Signal,
    pub value: f64,
    /// The deployment's moving mean before this call.
    pub mean: f64,
    pub z: f64,
    pub at: DateTime<Utc>,
}

/// Every deployment's series, and the recent anomalies.
#[derive(Debug, Default)]
pub struct Detector {
    config: AnomalyConfig,
    series: Mutex<HashMap<(String, Signal), Ewma>>,
    recent: Mutex<VecDeque<Anomaly>>,
}

impl Detector {
    pub fn new(config: AnomalyConfig) -> Self {
        Self {
            config,
            ..Self::default()
        }
    }

    /// Takes one call's `value` of `signal` on `deployment`; the anomaly when it is one.
    pub fn observe(&self, deployment: &str, signal: Signal, value: f64) -> Option<Anomaly> {
        let (mean, z) = {
            let mut series = self.series.lock().unwrap_or_else(PoisonError::into_inner);
            let ewma = series.entry((deployment.to_owned(), signal)).or_default();
            let mean = ewma.mean;
            (mean, ewma.observe(value, &self.config)?)
        };
        if z.abs() <= self.config.z_threshold {
            return None;
        }
        let anomaly = Anomaly {
            deployment: deployment.to_owned(),
            signal,
            value,
            mean,
            z,
            at: Utc::now(),
        };
        let mut recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        if recent.len() == RECENT {
            recent.pop_front();
        }
        recent.push_back(anomaly.clone());
        Some(anomaly)
    }

    /// The latest anomalies, oldest first.
    pub fn recent(&self) -> Vec<Anomaly> {
        self.recent
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 100 ms with a few milliseconds of deterministic jitter.
    fn steady_latency(i: u32) -> f64 {
        100.0 + 6.0 * (f64::from(i) * 0.7).sin()
    }

    #[test]
    fn a_latency_spike_stands_out_of_a_jittery_series_and_the_jitter_does_not() {
        let detector = Detector::new(AnomalyConfig::default());
        for i in 0..300 {
            assert_eq!(
                detector.observe("gpt", Signal::LatencyMs, steady_latency(i)),
                None,
                "call {i}"
            );
        }
        let spike = detector
            .observe("gpt", Signal::LatencyMs, 400.0)
            .expect("a fourfold latency is an anomaly");
        assert_eq!(
            (spike.deployment.as_str(), spike.signal),
            ("gpt", Signal::LatencyMs)
        );
        assert!(
            spike.z > 4.0 && (spike.mean - 100.0).abs() < 5.0,
            "{spike:?}"
        );
        // Another deployment has its own baseline: the same 400 ms is its normal.
        for _ in 0..30 {
            assert_eq!(detector.observe("local", Signal::LatencyMs, 400.0), None);
        }
        assert_eq!(detector.recent(), [spike]);
    }

    #[test]
    fn nothing_is_judged_during_warmup_and_a_lasting_change_becomes_the_baseline() {
        let config = AnomalyConfig::default();
        let detector = Detector::new(config);
        // The first calls are the baseline, whatever they are.
        for value in [50.0, 900.0, 50.0, 3000.0] {
            assert_eq!(detector.observe("m", Signal::CostMicrosUsd, value), None);
        }
        let detector = Detector::new(config);
        for _ in 0..50 {
            detector.observe("m", Signal::CostMicrosUsd, 50.0);
        }
        // A steady series tolerates a few percent…
        assert_eq!(detector.observe("m", Signal::CostMicrosUsd, 52.0), None);
        // …but not ten times the price.
        assert!(
            detector
                .observe("m", Signal::CostMicrosUsd, 500.0)
                .is_some()
        );
        // Prices that stay up stop being anomalies as the mean follows them.
        let flagged = (0..100)
            .filter(|_| {
                detector
                    .observe("m", Signal::CostMicrosUsd, 500.0)
                    .is_some()
            })
            .count();
        assert!(
            flagged < 20,
            "{flagged} of 100 calls at the new price flagged"
        );
        assert_eq!(detector.observe("m", Signal::CostMicrosUsd, 500.0), None);
    }

    #[test]
    fn bad_settings_are_named() {
        let mut problems = Vec::new();
        AnomalyConfig {
            alpha: 1.0,
            z_threshold: 0.0,
            warmup: 0,
            min_deviation_share: -1.0,
        }
        .validate(&mut problems);
        assert_eq!(problems.len(), 3, "{problems:?}");
    }
}
