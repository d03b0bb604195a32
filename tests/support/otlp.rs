//! A real OTLP/HTTP trace receiver for tests and benches: an axum server on a
//! free port taking `POST /v1/traces` (protobuf `ExportTraceServiceRequest`,
//! decoded with the `opentelemetry-proto` types) and keeping every span with the
//! `service.name` of the process that sent it. Point a process at it with
//! `OTEL_EXPORTER_OTLP_ENDPOINT=<Receiver::url>`.
//!
//! [`TraceSwitch`] turns span export on and off inside one process (the dispatch
//! bench compares the two on the in-process bus).

use std::sync::{Arc, Mutex, PoisonError};

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use bytes::Bytes;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
pub use opentelemetry_proto::tonic::trace::v1::{Span, span::SpanKind, status::StatusCode as Code};
use prost::Message as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// A span and the `service.name` of the process that sent it.
#[derive(Debug, Clone)]
pub struct Got {
    /// `service.name` of the sender's resource.
    pub service: String,
    /// The span as received.
    pub span: Span,
}

/// The running receiver; it stops with the test's runtime.
#[derive(Debug, Clone)]
pub struct Receiver {
    /// `http://127.0.0.1:<port>`: the value of `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub url: String,
    spans: Arc<Mutex<Vec<Got>>>,
    requests: Arc<Mutex<u64>>,
    /// Spans received (kept or not).
    received: Arc<std::sync::atomic::AtomicUsize>,
    /// Only count the spans (a bench), keep none.
    counting: bool,
}

impl Receiver {
    /// Starts one on a free port.
    ///
    /// # Panics
    ///
    /// When no port can be bound.
    pub async fn start() -> Receiver {
        Self::start_with(false).await
    }

    /// Starts one that only counts the spans it decodes (keeps none): for benches.
    ///
    /// # Panics
    ///
    /// When no port can be bound.
    pub async fn start_counting() -> Receiver {
        Self::start_with(true).await
    }

    async fn start_with(counting: bool) -> Receiver {
        let receiver = Receiver {
            url: String::new(),
            spans: Arc::default(),
            requests: Arc::default(),
            received: Arc::default(),
            counting,
        };
        let app = axum::Router::new()
            .route("/v1/traces", axum::routing::post(collect))
            .layer(axum::extract::DefaultBodyLimit::disable())
            .with_state(receiver.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("bound address");
        tokio::spawn(async move { axum::serve(listener, app).await });
        Receiver {
            url: format!("http://{addr}"),
            ..receiver
        }
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<Got> {
        self.spans
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// How many spans were received so far.
    pub fn count(&self) -> usize {
        self.received.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Forgets the spans received so far (a bench keeps no history).
    pub fn clear(&self) {
        self.spans
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        self.received.store(0, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A string, integer or boolean attribute value as text.
pub fn text(value: Option<&AnyValue>) -> Option<String> {
    match value?.value.as_ref()? {
        any_value::Value::StringValue(s) => Some(s.clone()),
        any_value::Value::IntValue(i) => Some(i.to_string()),
        any_value::Value::BoolValue(b) => Some(b.to_string()),
        _ => None,
    }
}

/// The attribute `key` of `attrs` as text.
pub fn attr(attrs: &[KeyValue], key: &str) -> Option<String> {
    attrs
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| text(kv.value.as_ref()))
}

/// Bytes as lowercase hex (trace and span ids).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn collect(State(receiver): State<Receiver>, body: Bytes) -> axum::response::Response {
    let Ok(request) = ExportTraceServiceRequest::decode(body) else {
        return (StatusCode::BAD_REQUEST, "not an ExportTraceServiceRequest").into_response();
    };
    *receiver
        .requests
        .lock()
        .unwrap_or_else(PoisonError::into_inner) += 1;
    let n: usize = request
        .resource_spans
        .iter()
        .flat_map(|rs| &rs.scope_spans)
        .map(|ss| ss.spans.len())
        .sum();
    receiver
        .received
        .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    if receiver.counting {
        return (
            [(header::CONTENT_TYPE, "application/x-protobuf")],
            ExportTraceServiceResponse::default().encode_to_vec(),
        )
            .into_response();
    }
    let mut got = receiver
        .spans
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    for rs in request.resource_spans {
        let service = rs
            .resource
            .as_ref()
            .and_then(|r| attr(&r.attributes, "service.name"))
            .unwrap_or_default();
        for ss in rs.scope_spans {
            for span in ss.spans {
                got.push(Got {
                    service: service.clone(),
                    span,
                });
            }
        }
    }
    (
        [(header::CONTENT_TYPE, "application/x-protobuf")],
        ExportTraceServiceResponse::default().encode_to_vec(),
    )
        .into_response()
}

type OtelLayer = tracing_opentelemetry::OpenTelemetryLayer<
    tracing_subscriber::Registry,
    opentelemetry_sdk::trace::SdkTracer,
>;

/// Span export inside this process that can be switched on and off: a global
/// `tracing` registry whose OpenTelemetry layer (exporting over OTLP/HTTP to an
/// endpoint, as `hookbus_kit::telemetry` does) is reloaded in or out, together
/// with `hookbus_kit::trace::set_enabled`. Off is exactly the production "off":
/// no OpenTelemetry layer and no spans created.
pub struct TraceSwitch {
    handle: tracing_subscriber::reload::Handle<Option<OtelLayer>, tracing_subscriber::Registry>,
    provider: opentelemetry_sdk::trace::SdkTracerProvider,
}

impl std::fmt::Debug for TraceSwitch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TraceSwitch").finish_non_exhaustive()
    }
}

impl TraceSwitch {
    /// Installs the global subscriber (switched off) exporting to `endpoint`
    /// (`<endpoint>/v1/traces`).
    ///
    /// # Panics
    ///
    /// When the exporter cannot be built or a global subscriber is installed already.
    pub fn install(endpoint: &str) -> TraceSwitch {
        use opentelemetry_otlp::WithExportConfig as _;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_endpoint(format!("{endpoint}/v1/traces"))
            .build()
            .expect("OTLP exporter");
        // A queue large enough that a bench keeps every span (the default, 2,048,
        // drops spans beyond it; OTEL_BSP_MAX_QUEUE_SIZE sets it in the binaries),
        // and the default export batch (512). The bench reports the spans received
        // per event, so a span dropped would show.
        let config = || {
            opentelemetry_sdk::trace::BatchConfigBuilder::default()
                .with_max_queue_size(1 << 16)
                .with_max_export_batch_size(512)
                .with_scheduled_delay(std::time::Duration::from_millis(200))
                .build()
        };
        let processor = if Self::export_kind() == "none" {
            opentelemetry_sdk::trace::BatchSpanProcessor::builder(Noop)
                .with_batch_config(config())
                .build()
        } else {
            opentelemetry_sdk::trace::BatchSpanProcessor::builder(exporter)
                .with_batch_config(config())
                .build()
        };
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_resource(
                opentelemetry_sdk::Resource::builder()
                    .with_service_name("bench")
                    .build(),
            )
            .build();
        let (layer, handle) = tracing_subscriber::reload::Layer::new(None::<OtelLayer>);
        // The `hookbus` binary's default filter (`RUST_LOG` unset), so that spans
        // and events below it are turned off at their call sites, as they are there.
        tracing_subscriber::registry()
            .with(layer)
            .with(tracing_subscriber::EnvFilter::new(
                hookbus_kit::telemetry::BINARY_DEFAULT_FILTER,
            ))
            .try_init()
            .expect("no global subscriber yet");
        TraceSwitch { handle, provider }
    }

    /// `otlp` (spans exported to the receiver), or `none` when
    /// `BENCH_TRACE_EXPORT=none`: spans are made and batched, then dropped by a
    /// no-op exporter, which separates the cost of making spans from that of
    /// encoding and sending them.
    pub fn export_kind() -> &'static str {
        if std::env::var("BENCH_TRACE_EXPORT").as_deref() == Ok("none") {
            "none"
        } else {
            "otlp"
        }
    }

    /// Exports spans from now on.
    ///
    /// # Panics
    ///
    /// When the subscriber is gone.
    pub fn on(&self) {
        let layer = tracing_opentelemetry::layer()
            .with_tracer(self.provider.tracer("hookbus"))
            .with_tracked_inactivity(false)
            .with_threads(false)
            .with_location(false)
            .with_target(false);
        self.handle.reload(Some(layer)).expect("reload");
        hookbus_kit::trace::set_enabled(true);
    }

    /// No spans from now on (those queued are exported with [`TraceSwitch::flush`]).
    ///
    /// # Panics
    ///
    /// When the subscriber is gone.
    pub fn off(&self) {
        hookbus_kit::trace::set_enabled(false);
        self.handle.reload(None).expect("reload");
    }

    /// Exports the queued spans now.
    pub fn flush(&self) {
        let _ = self.provider.force_flush();
    }
}

/// An exporter that drops every batch (`BENCH_TRACE_EXPORT=none`).
#[derive(Debug)]
struct Noop;

impl opentelemetry_sdk::trace::SpanExporter for Noop {
    async fn export(
        &self,
        _batch: Vec<opentelemetry_sdk::trace::SpanData>,
    ) -> opentelemetry_sdk::error::OTelSdkResult {
        Ok(())
    }
}
