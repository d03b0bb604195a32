//! What every long-running binary of the bus does at its edges: wait for the
//! signal to stop, and print an error with each of its causes once.

use tracing::{info, warn};

/// Completes on Ctrl-C or (on Unix) SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            warn!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => info!("Ctrl-C received"),
        () = term => info!("SIGTERM received"),
    }
}

/// An error and its causes on one line, each cause once: a layer ending with its
/// cause's text (`kind: cause`, as many `Display`s are) is cut before it, and a
/// cause whose text the line already holds, also after a `name: ` prefix of its
/// own (`nats: authorization violation` after `authorization violation`), is not
/// repeated. `hookbus` and the example
/// plugins print their errors with this.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut said = String::new();
    let mut next = Some(error);
    while let Some(e) = next {
        let full = e.to_string();
        // A layer that ends with its cause's text ("kind: cause"): the cause says it next.
        let text = match e.source().map(|s| s.to_string()) {
            Some(cause)
                if !cause.is_empty() && full.len() > cause.len() && full.ends_with(&cause) =>
            {
                full[..full.len() - cause.len()].trim_end_matches([':', ' '])
            }
            _ => full.as_str(),
        };
        let text = text.trim();
        let lower = text.to_lowercase();
        let rest = lower.split_once(": ").map_or("", |(_, rest)| rest);
        let repeated = said.contains(&lower) || (!rest.is_empty() && said.contains(rest));
        if !text.is_empty() && !repeated {
            parts.push(text.to_owned());
            said.push_str(&lower);
            said.push('\n');
        }
        next = e.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_chain_prints_each_cause_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("inner cause")]
        struct Inner;
        #[derive(Debug, thiserror::Error)]
        #[error("middle: {0}")]
        struct Middle(#[source] Inner);
        #[derive(Debug, thiserror::Error)]
        #[error("outer step failed")]
        struct Outer(#[source] Middle);
        let e = Outer(Middle(Inner));
        assert_eq!(error_chain(&e), "outer step failed: middle: inner cause");
        // async-nats: the kind, then the server's text with a prefix.
        #[derive(Debug, thiserror::Error)]
        #[error("nats: authorization violation")]
        struct Server;
        #[derive(Debug, thiserror::Error)]
        #[error("authorization violation: {0}")]
        struct Connect(#[source] Server);
        #[derive(Debug, thiserror::Error)]
        #[error("cannot connect to NATS at nats://x")]
        struct Cli(#[source] Connect);
        assert_eq!(
            error_chain(&Cli(Connect(Server))),
            "cannot connect to NATS at nats://x: authorization violation"
        );
    }
}
