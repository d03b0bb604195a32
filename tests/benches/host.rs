//! (placeholder: written by the host work)
fn main() {}
