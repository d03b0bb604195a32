//! Shared pieces of the benchmarks (`tests/benches/*.rs`): knobs from the
//! environment, medians and percentiles, and the `main` that runs a bench in
//! smoke mode under `cargo test` and in full under `cargo bench`.

use std::future::Future;

/// A positive number from the environment, else `default`.
pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(default)
}

/// The `p`-th percentile (0–100) of sorted values (nearest rank); NaN when empty.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The median (mean of the two middle values for an even count); NaN when empty.
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    }
}

/// Runs a bench's body on a multi-threaded runtime. `cargo bench` passes
/// `--bench`: then `smoke` is false; under `cargo test` it is true (a quick run
/// that checks the bench still works). Other arguments (a filter) are ignored.
///
/// # Panics
///
/// When the runtime cannot be built.
pub fn main<F, Fut>(bench: F)
where
    F: FnOnce(bool) -> Fut,
    Fut: Future<Output = ()>,
{
    let smoke = !std::env::args().any(|a| a == "--bench");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(bench(smoke));
}
