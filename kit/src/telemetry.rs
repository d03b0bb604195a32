//! The tracing set-up of every binary (the `hookbus` binary, plugins through the
//! SDK's `run_main`), in one place: logs on stderr filtered by `RUST_LOG`, and,
//! only when the standard OpenTelemetry variables name an endpoint, the export of
//! spans over OTLP/HTTP (protobuf).
//!
//! | variable | effect |
//! |---|---|
//! | `OTEL_EXPORTER_OTLP_ENDPOINT` | base URL of the receiver; spans go to `<url>/v1/traces` |
//! | `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` | full URL for spans (wins over the one above) |
//! | `OTEL_SERVICE_NAME` | `service.name` (default: the binary's, e.g. `hookbus`, the plugin id) |
//! | `OTEL_SDK_DISABLED=true` | no export even with an endpoint |
//! | `OTEL_BSP_SCHEDULE_DELAY`, `OTEL_BSP_MAX_QUEUE_SIZE`, … | the batch processor's settings |
//!
//! Without an endpoint no OpenTelemetry layer is installed at all and
//! [`crate::trace::enabled`] stays false.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// What [`init`] installed; dropping it flushes and shuts down the span export
/// (keep it until the end of `main`).
#[derive(Debug)]
#[must_use = "dropping it at once shuts the span export down"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Flushes the spans still queued and stops the export (also done on drop).
    pub fn shutdown(&mut self) {
        if let Some(provider) = self.provider.take() {
            crate::trace::set_enabled(false);
            if let Err(e) = provider.shutdown() {
                tracing::warn!(error = %e, "flushing the trace export failed");
            }
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Whether the environment asks for trace export.
pub fn export_configured() -> bool {
    let set = |k: &str| std::env::var(k).is_ok_and(|v| !v.trim().is_empty());
    let disabled =
        std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.trim().eq_ignore_ascii_case("true"));
    !disabled && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

/// The `hookbus` binary's log and span filter when `RUST_LOG` is not set.
pub const BINARY_DEFAULT_FILTER: &str = "info,async_nats=warn";

/// Installs the process's `tracing` subscriber: logs on stderr filtered by
/// `RUST_LOG` (else `default_filter`), ANSI colours on a terminal, and the
/// OpenTelemetry layer when [`export_configured`]; `service` is the
/// `service.name` unless `OTEL_SERVICE_NAME` says otherwise. Does nothing (and
/// exports nothing) when a subscriber is installed already. An exporter that
/// cannot be built is reported on stderr and the process goes on without it.
pub fn init(default_filter: &str, service: &str) -> Telemetry {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let provider = if export_configured() {
        match provider(service) {
            Ok(p) => Some(p),
            Err(e) => {
                // No subscriber yet to log with.
                #[allow(clippy::print_stderr)]
                {
                    eprintln!("trace export is off: the OTLP exporter failed: {e}");
                }
                None
            }
        }
    } else {
        None
    };
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("hookbus"))
            .with_tracked_inactivity(false)
            .with_threads(false)
            .with_location(false)
            .with_target(false)
    });
    let installed = tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init()
        .is_ok();
    if !installed {
        if let Some(p) = provider {
            let _ = p.shutdown();
        }
        return Telemetry { provider: None };
    }
    if provider.is_some() {
        crate::trace::set_enabled(true);
    }
    Telemetry { provider }
}

fn provider(service: &str) -> Result<SdkTracerProvider, opentelemetry_otlp::ExporterBuildError> {
    use opentelemetry_otlp::WithExportConfig as _;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .build()?;
    let resource = if std::env::var("OTEL_SERVICE_NAME").is_ok_and(|v| !v.trim().is_empty()) {
        Resource::builder().build()
    } else {
        Resource::builder()
            .with_service_name(service.to_owned())
            .build()
    };
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}
