//! OpenTelemetry traces exported over OTLP (gRPC), configured by the standard `OTEL_*` variables; the
//! one place where the operator, the aggregator and the trainer set up tracing export.
//!
//! Off by default: unless `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT` is set
//! (and `OTEL_SDK_DISABLED` is not `true`, `OTEL_TRACES_EXPORTER` not `none`), no exporter is built and
//! no OpenTelemetry layer is installed: spans are then only the `tracing` spans the log lines show.
//!
//! When on, spans of the `caduceus*` targets at INFO and above go to a batch span processor (its own
//! thread, a bounded queue that drops when full: `OTEL_BSP_*`) and from there to the collector with
//! the tonic exporter (`OTEL_EXPORTER_OTLP_TIMEOUT`, `_HEADERS`, `_COMPRESSION`, ... as
//! opentelemetry-otlp reads them). The sampler comes from `OTEL_TRACES_SAMPLER`/`_ARG` (default: parent
//! based, always on), the resource from `OTEL_RESOURCE_ATTRIBUTES`, the service name from
//! `OTEL_SERVICE_NAME` or else the binary's own (`caduceus-operator`, `caduceus-aggregator`,
//! `caduceus-trainer`). An unreachable collector fails nothing: exports time out on the processor's
//! thread, and [`Telemetry::shutdown`] flushes for [`FLUSH_TIMEOUT`] at most.
//!
//! Only the gRPC protocol is built in; `OTEL_EXPORTER_OTLP_PROTOCOL=http/...` turns export off with a
//! warning rather than sending gRPC to an HTTP port.
//!
//! A round is one trace: the operator derives a W3C `traceparent` from the round's uid and passes it to
//! the round's pods as `TRACEPARENT`; [`continue_trace`] makes a span a child of that remote parent.
use std::collections::HashMap;
use std::time::Duration;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

/// The variable that carries a round's W3C trace context into its pods.
pub const TRACEPARENT_ENV: &str = "TRACEPARENT";

/// The variables that name an OTLP endpoint (the traces-specific one first); with neither, export is off.
pub const ENDPOINT_ENVS: [&str; 2] = [
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
];

/// The variables that choose the OTLP protocol (the traces-specific one first).
const PROTOCOL_ENVS: [&str; 2] = [
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
];

/// How long [`Telemetry::shutdown`] waits for the last spans to get out.
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(3);

/// The target prefix of the spans that are exported (the workspace's crates).
const EXPORTED_TARGETS: &str = "caduceus";

fn non_empty(get: &impl Fn(&str) -> Option<String>, key: &str) -> Option<String> {
    get(key).map(|v| v.trim().to_string()).filter(|v| !v.is_empty())
}

/// Whether the variables read by `get` turn OTLP export on (see the module documentation).
pub fn enabled_by(get: impl Fn(&str) -> Option<String>) -> bool {
    if non_empty(&get, "OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"))
        || non_empty(&get, "OTEL_TRACES_EXPORTER").is_some_and(|v| v.eq_ignore_ascii_case("none"))
    {
        return false;
    }
    ENDPOINT_ENVS.iter().any(|k| non_empty(&get, k).is_some())
}

/// The `OTEL_*` variables among `vars` that a process passes on to the workloads it starts, so that they
/// export to the same collector: every `OTEL_*` variable but `OTEL_SERVICE_NAME` (each binary names
/// itself), and none at all unless they turn export on. Sorted by name.
pub fn forwarded_env(vars: impl IntoIterator<Item = (String, String)>) -> Vec<(String, String)> {
    let mut otel: Vec<(String, String)> = vars
        .into_iter()
        .filter(|(k, _)| k.starts_with("OTEL_") && k != "OTEL_SERVICE_NAME")
        .collect();
    otel.sort();
    let lookup = |key: &str| otel.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
    if enabled_by(lookup) { otel } else { Vec::new() }
}

/// The OpenTelemetry set-up of a process: the tracer provider when export is on. Dropping it flushes
/// like [`Telemetry::shutdown`].
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    service: &'static str,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("service", &self.service)
            .field("exporting", &self.exporting())
            .finish()
    }
}

impl Telemetry {
    /// No export.
    pub fn off(service: &'static str) -> Self {
        Self {
            provider: None,
            service,
        }
    }

    /// From the process environment ([`Telemetry::from_vars`]).
    pub fn from_env(service: &'static str) -> Self {
        Self::from_vars(service, |k| std::env::var(k).ok())
    }

    /// From the variables `get` reads. When they turn export on this builds the tonic exporter, which
    /// needs to be called within a tokio runtime that outlives the returned value. Problems (an
    /// unsupported protocol, an invalid endpoint) are said on standard error, and export stays off.
    pub fn from_vars(service: &'static str, get: impl Fn(&str) -> Option<String>) -> Self {
        if !enabled_by(&get) {
            return Self::off(service);
        }
        if let Some(p) = PROTOCOL_ENVS.iter().find_map(|k| non_empty(&get, k))
            && p != "grpc"
        {
            eprintln!(
                "warning: OTEL_EXPORTER_OTLP_PROTOCOL={p} is not supported (only grpc is built in); spans are not exported"
            );
            return Self::off(service);
        }
        let exporter = match opentelemetry_otlp::SpanExporter::builder().with_tonic().build() {
            Ok(e) => e,
            Err(e) => {
                eprintln!("warning: cannot build the OTLP span exporter ({e}); spans are not exported");
                return Self::off(service);
            }
        };
        let resource = opentelemetry_sdk::Resource::builder();
        let resource = if non_empty(&get, "OTEL_SERVICE_NAME").is_some() {
            resource.build()
        } else {
            resource.with_service_name(service).build()
        };
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build();
        Self {
            provider: Some(provider),
            service,
        }
    }

    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// The layer that turns `tracing` spans of the `caduceus*` targets into OpenTelemetry spans; `None`
    /// when export is off.
    pub fn layer<S>(&self) -> Option<impl Layer<S> + Send + Sync + 'static>
    where
        S: tracing::Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
    {
        let tracer = self.provider.as_ref()?.tracer(self.service);
        Some(
            tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_filter(Targets::new().with_target(EXPORTED_TARGETS, tracing::Level::INFO)),
        )
    }

    /// Exports the spans still queued (waiting [`FLUSH_TIMEOUT`] at most) and stops export. The
    /// runtime that was current when the exporter was built must still run.
    pub fn shutdown(&mut self) {
        if let Some(p) = self.provider.take()
            && let Err(e) = p.shutdown_with_timeout(FLUSH_TIMEOUT)
        {
            eprintln!("warning: flushing spans to the OTLP collector: {e}");
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Installs the global subscriber: `logs` (a formatting layer with its own filter) and, when export is
/// on ([`Telemetry::from_env`]), the OpenTelemetry layer. Call within the tokio runtime of the program;
/// keep the returned value until the program ends (dropping it flushes the spans).
pub fn install<L>(logs: L, service: &'static str) -> Telemetry
where
    L: Layer<tracing_subscriber::Registry> + Send + Sync + 'static,
{
    let telemetry = Telemetry::from_env(service);
    let subscriber = tracing_subscriber::registry().with(logs);
    let otel = telemetry.layer();
    subscriber.with(otel).init();
    telemetry
}

/// The remote parent that a W3C `traceparent` (`00-<trace id>-<span id>-<flags>`) names, parsed with
/// the W3C trace-context propagator; `None` when it is malformed.
pub fn remote_parent(traceparent: &str) -> Option<opentelemetry::Context> {
    let carrier = HashMap::from([("traceparent".to_string(), traceparent.trim().to_string())]);
    let cx = TraceContextPropagator::new().extract(&carrier);
    cx.span().span_context().is_valid().then_some(cx)
}

/// This process's `TRACEPARENT`, when set.
pub fn env_traceparent() -> Option<String> {
    std::env::var(TRACEPARENT_ENV)
        .ok()
        .filter(|v| !v.trim().is_empty())
}

/// Makes `span` a child of the remote parent `traceparent` names, so that it joins that trace. Call it
/// before the span is first entered. Returns whether it did: false without an OpenTelemetry layer
/// (export off), for a disabled span, or for a missing or malformed `traceparent`.
pub fn continue_trace(span: &tracing::Span, traceparent: Option<&str>) -> bool {
    match traceparent.and_then(remote_parent) {
        Some(cx) => span.set_parent(cx).is_ok(),
        None => false,
    }
}

/// The trace id (32 hex digits) of `span` as exported; `None` without an OpenTelemetry layer.
pub fn trace_id(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn vars<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
    }

    #[test]
    fn traceparent_parses_to_its_trace_id() {
        let cx = remote_parent(TP).expect("a valid traceparent");
        let sc = cx.span().span_context().clone();
        assert_eq!(sc.trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(sc.span_id().to_string(), "00f067aa0ba902b7");
        assert!(sc.is_remote() && sc.is_sampled());
        for bad in [
            "",
            "00-xyz-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        ] {
            assert!(remote_parent(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn without_an_endpoint_nothing_is_exported_and_spans_join_no_trace() {
        for env in [
            &[][..],
            &[("OTEL_SERVICE_NAME", "x"), ("OTEL_TRACES_SAMPLER", "always_on")][..],
            &[("OTEL_EXPORTER_OTLP_ENDPOINT", " ")][..],
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:1"),
                ("OTEL_SDK_DISABLED", "true"),
            ][..],
            &[
                ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://127.0.0.1:1"),
                ("OTEL_TRACES_EXPORTER", "none"),
            ][..],
        ] {
            assert!(!enabled_by(vars(env)), "{env:?}");
            // No runtime here: building the tonic exporter would need one, so none was built.
            let t = Telemetry::from_vars("caduceus-test", vars(env));
            assert!(!t.exporting(), "{env:?}");
            assert!(t.layer::<tracing_subscriber::Registry>().is_none());
        }
        // A subscriber without the OpenTelemetry layer: a span cannot continue the trace and has no id.
        let subscriber = tracing_subscriber::registry().with(tracing_subscriber::fmt::layer());
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("caduceus test span");
            assert!(!continue_trace(&span, Some(TP)));
            assert_eq!(trace_id(&span), None);
        });
    }

    #[test]
    fn unsupported_protocols_turn_export_off() {
        let env = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:1"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
        ];
        assert!(enabled_by(vars(&env)));
        assert!(!Telemetry::from_vars("caduceus-test", vars(&env)).exporting());
    }

    #[test]
    fn forwards_the_otel_variables_only_when_they_turn_export_on() {
        let own = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<Vec<_>>()
        };
        let on = own(&[
            ("PATH", "/bin"),
            ("OTEL_SERVICE_NAME", "caduceus-operator"),
            ("OTEL_TRACES_SAMPLER", "parentbased_always_on"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317"),
            ("TRACEPARENT", TP),
        ]);
        assert_eq!(
            forwarded_env(on),
            own(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317"),
                ("OTEL_TRACES_SAMPLER", "parentbased_always_on"),
            ])
        );
        let off = own(&[("OTEL_SERVICE_NAME", "x"), ("OTEL_TRACES_SAMPLER", "always_on")]);
        assert!(forwarded_env(off).is_empty());
    }

    /// With an endpoint nothing listens on, spans join the round's trace and flushing gives up within
    /// its bound: an unreachable collector blocks nothing.
    #[test]
    fn an_unreachable_collector_neither_fails_nor_blocks() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let endpoint = format!("http://127.0.0.1:{port}");
        let env = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "500"),
        ];
        let mut t = {
            let _in_runtime = rt.enter();
            Telemetry::from_vars("caduceus-test", vars(&env))
        };
        assert!(t.exporting());
        let subscriber = tracing_subscriber::registry().with(t.layer());
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("caduceus test span", caduceus.round = 3);
            assert!(continue_trace(&span, Some(TP)));
            assert_eq!(
                trace_id(&span).as_deref(),
                Some("4bf92f3577b34da6a3ce929d0e0e4736")
            );
            span.in_scope(|| tracing::info!("inside"));
            // A span of another target is not exported (no id of its own trace).
            let other = tracing::info_span!(target: "h2", "not ours");
            assert_eq!(trace_id(&other), None);
        });
        let start = Instant::now();
        t.shutdown();
        assert!(
            start.elapsed() < FLUSH_TIMEOUT + Duration::from_secs(2),
            "flushing took {:?}",
            start.elapsed()
        );
        assert!(!t.exporting());
    }
}
