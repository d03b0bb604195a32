//! Running Python programs in tests: the interpreter with nats-py, and reading a
//! child's output line by line.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, BufReader};

use crate::workspace_root;

/// The Python to run plugins and examples with: `HOOKBUS_PYTHON` (set by
/// `tests/setup/ensure-tools.sh`, which installs nats-py and the OpenTelemetry SDK
/// into `.tools/pyvenv`), else
/// `.tools/pyvenv/bin/python`.
///
/// # Panics
///
/// When that Python cannot import nats-py or the OpenTelemetry SDK: the tests that need it fail, never skip,
/// because CI must run them.
pub fn python() -> PathBuf {
    let python = std::env::var_os("HOOKBUS_PYTHON")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join(".tools/pyvenv/bin/python"));
    let ok = Command::new(&python)
        .args([
            "-c",
            "import nats, opentelemetry.sdk, opentelemetry.exporter.otlp.proto.http",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "{} has no nats-py or no opentelemetry-sdk with its OTLP/HTTP exporter: run \
         `source tests/setup/ensure-tools.sh` (./test.sh does), which installs them into \
         .tools/pyvenv, or set HOOKBUS_PYTHON",
        python.display()
    );
    python
}

/// The lines a child has printed so far, filled by a task.
pub type Lines = Arc<Mutex<Vec<String>>>;

/// Reads `pipe` line by line in a task; the lines so far are in the returned vector.
pub fn collect_lines<R>(pipe: R) -> Lines
where
    R: tokio::io::AsyncRead + Send + Unpin + 'static,
{
    let sink: Lines = Arc::default();
    let lines_so_far = sink.clone();
    tokio::spawn(async move {
        let mut lines = BufReader::new(pipe).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            sink.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(line);
        }
    });
    lines_so_far
}
