//! The Prometheus registry and the named metrics every part of swav records into.
//!
//! A leaf module: it imports nothing of ours, so anyone may depend on it.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Latency buckets in seconds: 100 µs .. 10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

pub struct Metrics {
    pub registry: Registry,
    /// `route`, `method`, `status`.
    pub requests: IntCounterVec,
    /// Whole request latency by `route`.
    pub request_seconds: HistogramVec,
    /// Per image: bytes → tensor.
    pub decode_seconds: Histogram,
    /// Per image: time in the batcher's queue before its batch started.
    pub queue_seconds: Histogram,
    /// Per batch: one ONNX Runtime run.
    pub inference_seconds: Histogram,
    pub batch_size: Histogram,
    pub queue_depth: IntGauge,
    /// Requests waiting for room in the queue, their bodies unread.
    pub admission_waiting: IntGauge,
    pub images_decoded: IntCounter,
    /// `reason`: the error code of the rejection.
    pub images_rejected: IntCounterVec,
    /// Requests refused because the queue was full.
    pub overloaded: IntCounter,
    /// Queued images dropped because their caller went away.
    pub cancelled: IntCounter,
    /// 1 for the provider in use, labelled by `provider`.
    pub execution_provider: IntGaugeVec,
    pub ready: IntGauge,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new_custom(Some("swav".into()), None).expect("static prefix is valid");
        let m = Metrics {
            requests: IntCounterVec::new(
                Opts::new("http_requests_total", "HTTP requests by route, method and status"),
                &["route", "method", "status"],
            )
            .expect("static metric"),
            request_seconds: HistogramVec::new(
                HistogramOpts::new("http_request_duration_seconds", "HTTP request latency by route")
                    .buckets(LATENCY_BUCKETS.to_vec()),
                &["route"],
            )
            .expect("static metric"),
            decode_seconds: histogram("decode_duration_seconds", "Image decode + preprocess time per image"),
            queue_seconds: histogram("queue_duration_seconds", "Time an image waits in the batch queue"),
            inference_seconds: histogram("inference_duration_seconds", "ONNX Runtime run time per batch"),
            batch_size: Histogram::with_opts(
                HistogramOpts::new("batch_size", "Images per inference batch").buckets(BATCH_BUCKETS.to_vec()),
            )
            .expect("static metric"),
            queue_depth: IntGauge::new("queue_depth", "Images waiting in the batch queue").expect("static metric"),
            admission_waiting: IntGauge::new("admission_waiting", "Requests waiting for room in the batch queue")
                .expect("static metric"),
            images_decoded: IntCounter::new("images_decoded_total", "Images decoded and preprocessed")
                .expect("static metric"),
            images_rejected: IntCounterVec::new(
                Opts::new("images_rejected_total", "Images rejected, by reason"),
                &["reason"],
            )
            .expect("static metric"),
            overloaded: IntCounter::new("overloaded_total", "Images refused because the queue was full")
                .expect("static metric"),
            cancelled: IntCounter::new("cancelled_total", "Queued images dropped because the client went away")
                .expect("static metric"),
            execution_provider: IntGaugeVec::new(
                Opts::new("execution_provider", "ONNX Runtime execution provider in use (1 = active)"),
                &["provider"],
            )
            .expect("static metric"),
            ready: IntGauge::new("ready", "1 once the model is loaded and warmed up").expect("static metric"),
            registry,
        };
        m.register_all();
        m
    }

    fn register_all(&self) {
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(self.requests.clone()),
            Box::new(self.request_seconds.clone()),
            Box::new(self.decode_seconds.clone()),
            Box::new(self.queue_seconds.clone()),
            Box::new(self.inference_seconds.clone()),
            Box::new(self.batch_size.clone()),
            Box::new(self.queue_depth.clone()),
            Box::new(self.admission_waiting.clone()),
            Box::new(self.images_decoded.clone()),
            Box::new(self.images_rejected.clone()),
            Box::new(self.overloaded.clone()),
            Box::new(self.cancelled.clone()),
            Box::new(self.execution_provider.clone()),
            Box::new(self.ready.clone()),
        ];
        for c in collectors {
            self.registry.register(c).expect("metric names are unique");
        }
    }

    /// Prometheus text exposition of everything registered.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metrics.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

fn histogram(name: &str, help: &str) -> Histogram {
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec())).expect("static metric")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_named_metrics() {
        let m = Metrics::new();
        m.requests.with_label_values(&["/v1/embed", "POST", "200"]).inc();
        m.execution_provider.with_label_values(&["cpu"]).set(1);
        m.batch_size.observe(3.0);
        let text = m.render();
        assert!(text.contains("swav_http_requests_total{method=\"POST\",route=\"/v1/embed\",status=\"200\"} 1"));
        assert!(text.contains("swav_execution_provider{provider=\"cpu\"} 1"));
        assert!(text.contains("swav_batch_size_count 1"));
        assert!(text.contains("swav_queue_depth 0"));
    }
}
