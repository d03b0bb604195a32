//! Plugin API routes: HTTP routes the host serves under
//! `/api/v2/plugins/<plugin-id>/…` and forwards to the plugin over request/reply.
//!
//! Declare a route with [`PluginBuilder::api_route`] (name, method, path, handler);
//! its options go with its name, as an [`ApiRoute`]:
//! [`public`](ApiRoute::public) lets requests without a token through, and
//! [`timeout`](ApiRoute::timeout) sets how long the host waits (5 s by
//! default, then HTTP 504). Each route is an endpoint of the plugin's NATS service
//! on `<prefix>.api.<plugin-id>.<route>` (queue group = plugin id), next to the
//! hook handlers (metadata `kind=api`, `method`, `path`, `public`, `timeout_ms`,
//! so `nats micro info <plugin-id>` lists it), and shares their concurrency limit.
//!
//! The handler gets an [`ApiContext`]: the forwarded [`ApiRequest`] (method, path
//! below the plugin's prefix, query, forwarded headers, JSON body, the
//! authenticated user) and the path parameters of the route's `{name}` segments
//! (and `*` for the rest matched by a last `*` segment). It answers an
//! [`ApiResponse`] (status, headers, JSON body), which the host sends as the
//! HTTP response. A [`HandlerError`] the handler returns is replied with code
//! 400, a panic or a call running past the timeout with code 500; the host
//! answers either as HTTP 400 `{"error": "plugin_error", "message": …,
//! "plugin_id": …}`. A request that is no [`ApiRequest`] gets a 400 error reply
//! naming the problem. A response the host
//! would refuse (status outside 100–599, a bad header, more than
//! [`MAX_API_REPLY_BYTES`](core_events::plugin_api::MAX_API_REPLY_BYTES)) is
//! turned into a plugin error naming the problem, here, so it shows in the
//! plugin's log too.
//!
//! ```no_run
//! use std::time::Duration;
//!
//! use pagoda_plugin_sdk::{ApiResponse, ApiRoute, Plugin};
//! use serde_json::json;
//!
//! # fn example() -> Result<(), pagoda_plugin_sdk::ManifestError> {
//! let plugin = Plugin::builder("hello-world", "Hello World", "1.0.0")
//!     .api_route("greet", "GET", "/greet/{name}", |ctx| async move {
//!         let name = ctx.param("name").unwrap_or("world");
//!         Ok(ApiResponse::ok(json!({ "greeting": format!("Hello, {name}!") })))
//!     })
//!     .api_route(
//!         ApiRoute::named("ping").public().timeout(Duration::from_secs(1)),
//!         "GET",
//!         "/ping",
//!         |_ctx| async { Ok(ApiResponse::ok(json!("pong"))) },
//!     )
//!     .build()?;
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use async_nats::service::Request;
use bytes::Bytes;
use core_events::plugin_api::{ApiRequest, ApiResponse};
use core_events::{ApiRouteSpec, User};
use serde::de::DeserializeOwned;
use tracing::{Instrument, warn};

use crate::error::HandlerError;
use crate::plugin::{ApiRoute, PluginBuilder};

/// What an API route handler's future resolves to.
pub type ApiResult = Result<ApiResponse, HandlerError>;

type BoxApiFuture = Pin<Box<dyn Future<Output = ApiResult> + Send + 'static>>;
/// A type-erased API route handler.
pub(crate) type ApiCall = Arc<dyn Fn(ApiContext) -> BoxApiFuture + Send + Sync + 'static>;

/// One request to an API route; `S` is the plugin's state
/// ([`PluginBuilder::state`]), `()` without one.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ApiContext<S = ()> {
    /// The request as the host forwarded it.
    pub request: ApiRequest,
    /// The values of the route path's `{name}` segments, by name; the rest
    /// matched by a last `*` segment under `*` (without a leading `/`).
    pub params: BTreeMap<String, String>,
    /// The plugin id.
    pub plugin_id: Arc<str>,
    /// The route name.
    pub route: Arc<str>,
    /// The plugin's state, shared by all its handlers.
    pub state: S,
}

impl ApiContext {
    /// A context for `request` to `spec`, e.g. to call a route handler in a unit
    /// test: the path parameters are read from `request.path`.
    pub fn new(plugin_id: &str, spec: &ApiRouteSpec, request: ApiRequest) -> Self {
        ApiContext {
            params: path_params(&spec.path, &request.path),
            request,
            plugin_id: plugin_id.into(),
            route: spec.name.as_str().into(),
            state: (),
        }
    }
}

impl<S> ApiContext<S> {
    /// The same request with `state` as the plugin's state, e.g. to call a
    /// route handler of a plugin with state in a unit test.
    pub fn with_state<T>(self, state: T) -> ApiContext<T> {
        ApiContext {
            request: self.request,
            params: self.params,
            plugin_id: self.plugin_id,
            route: self.route,
            state,
        }
    }

    /// The HTTP method, upper case.
    pub fn method(&self) -> &str {
        &self.request.method
    }

    /// The request path below `/api/v2/plugins/<plugin-id>`, starting with `/`.
    pub fn path(&self) -> &str {
        &self.request.path
    }

    /// The body: JSON as sent, a JSON string for a non-JSON body, `null` for none.
    pub fn body(&self) -> &serde_json::Value {
        &self.request.body
    }

    /// The path parameter `name` (a `{name}` segment of the route path, or `*`).
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params.get(name).map(String::as_str)
    }

    /// The query parameter `name` (the last value when repeated).
    pub fn query(&self, name: &str) -> Option<&str> {
        self.request.query.get(name).map(String::as_str)
    }

    /// The forwarded request header `name` (lower case: `accept`,
    /// `content-type`, `user-agent`, `traceparent`).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.request.headers.get(name).map(String::as_str)
    }

    /// The authenticated user; `None` only on a [`public`](ApiRoute::public) route.
    pub fn user(&self) -> Option<&User> {
        self.request.user.as_ref()
    }

    /// The JSON body as a `T`.
    ///
    /// # Errors
    ///
    /// A permanent [`HandlerError`] naming what does not fit: the host answers it
    /// as a plugin error (HTTP 400).
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, HandlerError> {
        T::deserialize(&self.request.body)
            .map_err(|e| HandlerError::permanent(format!("request body is not valid: {e}")))
    }
}

impl<S> PluginBuilder<S>
where
    S: Clone + Send + Sync + 'static,
{
    /// Adds an API route: the host answers `<method> /api/v2/plugins/<plugin-id><path>`
    /// by calling `f` (see [`crate::api`]).
    ///
    /// `route` is its name (letters, digits, `-`, `_`; it names the route's
    /// endpoint and must differ from the handler names) or an [`ApiRoute`] with
    /// options. `method` is `GET`, `POST`, `PUT`, `PATCH` or
    /// `DELETE`; `path` starts with `/`, a segment `{name}` matches any one segment
    /// (read it with [`ApiContext::param`]) and a last segment `*` matches any
    /// rest; trailing slashes do not matter. Only authenticated users reach the
    /// route unless it is [`public`](ApiRoute::public); the host waits 5 s for an
    /// answer unless it has another [`timeout`](ApiRoute::timeout).
    pub fn api_route<F, Fut>(
        self,
        route: impl Into<ApiRoute>,
        method: &str,
        path: impl Into<String>,
        f: F,
    ) -> Self
    where
        F: Fn(ApiContext<S>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ApiResult> + Send + 'static,
    {
        let state = self.state.clone();
        let call: ApiCall = Arc::new(move |ctx| Box::pin(f(ctx.with_state(state.clone()))));
        let route: ApiRoute = route.into();
        let spec = route.into_spec(method, path.into());
        self.push_route(spec, call)
    }
}

/// The values of `pattern`'s `{name}` segments in `path` (and the rest matched by
/// a last `*` under `*`), for a path the host matched to the route.
fn path_params(pattern: &str, path: &str) -> BTreeMap<String, String> {
    let mut params = BTreeMap::new();
    let mut got = path.split('/').filter(|s| !s.is_empty());
    let want: Vec<&str> = pattern.split('/').filter(|s| !s.is_empty()).collect();
    for (n, seg) in want.iter().enumerate() {
        if *seg == "*" && n + 1 == want.len() {
            params.insert("*".to_owned(), got.by_ref().collect::<Vec<_>>().join("/"));
            break;
        }
        let Some(value) = got.next() else { break };
        if let Some(name) = seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
            params.insert(name.to_owned(), value.to_owned());
        }
    }
    params
}

/// One API route, as its endpoint sees it.
pub(crate) struct RouteSlot {
    pub(crate) plugin_id: Arc<str>,
    pub(crate) spec: ApiRouteSpec,
    pub(crate) call: ApiCall,
    pub(crate) subject: String,
}

/// Serves one request to an API route and replies.
pub(crate) async fn handle(request: Request, slot: Arc<RouteSlot>) {
    // With traces exported, a SERVER span (`handle <plugin>.<route>`), the child
    // of the host's CLIENT span whose context the request's `traceparent` carries.
    let span = tracing::info_span!(
        "plugin.api",
        otel.name = %format_args!("handle {}.{}", slot.plugin_id, slot.spec.name),
        otel.kind = "server",
        messaging.system = "nats",
        messaging.destination = %slot.subject,
        messaging.destination.name = %slot.subject,
        plugin = %slot.plugin_id,
        route = %slot.spec.name,
    );
    hookbus_kit::trace::follow_message(&span, request.message.headers.as_ref());
    let traced = span.clone();
    async {
        let outcome = answer(&slot, &request.message.payload).await;
        if let Err(err) = &outcome {
            let kind = if err.code() < 500 {
                "plugin_error"
            } else {
                "internal_error"
            };
            hookbus_kit::trace::fail(&traced, kind, &err.reply_text());
            warn!(
                plugin = %slot.plugin_id,
                route = %slot.spec.name,
                code = err.code(),
                error = %err.reply_text(),
                "api route failed"
            );
        }
        crate::serve::respond(&request, outcome).await;
    }
    .instrument(span)
    .await;
}

/// Decodes the request, calls the handler with the handler guards (in this
/// task: the host is waiting) and encodes and checks its response.
async fn answer(slot: &RouteSlot, payload: &Bytes) -> Result<Bytes, HandlerError> {
    let request: ApiRequest = serde_json::from_slice(payload).map_err(|e| {
        HandlerError::permanent(format!("request is not a valid plugin API request: {e}"))
    })?;
    let ctx = ApiContext::new(&slot.plugin_id, &slot.spec, request);
    // The handler's own errors are plugin errors (400); a panic or a call past
    // the timeout stays a 500.
    let call = (slot.call)(ctx);
    let response = crate::serve::guarded(
        async move {
            call.await
                .map_err(|e| HandlerError::permanent(e.reply_text()))
        },
        slot.spec.timeout(),
    )
    .await?;
    let body = serde_json::to_vec(&response)
        .map_err(|e| HandlerError::transient(format!("response cannot be encoded: {e}")))?;
    ApiResponse::parse(&body).map_err(|problem| {
        HandlerError::transient(format!(
            "route '{}' gave a response the host cannot send: {problem}",
            slot.spec.name
        ))
    })?;
    Ok(Bytes::from(body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Plugin;

    #[test]
    fn path_parameters_are_read_by_name() {
        let p = path_params("/greet/{name}", "/greet/Ada/");
        assert_eq!(p.get("name").map(String::as_str), Some("Ada"));
        let p = path_params("/items/{id}/files/*", "/items/7/files/a/b.txt");
        assert_eq!(p.get("id").map(String::as_str), Some("7"));
        assert_eq!(p.get("*").map(String::as_str), Some("a/b.txt"));
        assert!(path_params("/status", "/status").is_empty());
    }

    #[test]
    fn routes_are_declared_with_their_options() {
        let plugin = Plugin::builder("p", "P", "1.0.0")
            .api_route(
                ApiRoute::named("greet")
                    .public()
                    .timeout(std::time::Duration::from_millis(750)),
                "get",
                "/greet/{name}",
                |_ctx| async { Ok(ApiResponse::ok(serde_json::Value::Null)) },
            )
            .api_route("add", "POST", "/items", |_ctx| async {
                Ok(ApiResponse::with_status(201, serde_json::Value::Null))
            })
            .build()
            .expect("valid plugin");
        let api = &plugin.manifest().api;
        assert_eq!(api[0].method, "GET");
        assert!(api[0].public);
        assert_eq!(api[0].timeout_ms, 750);
        assert!(!api[1].public);
        assert_eq!(api[1].timeout_ms, 5_000);
        assert_eq!(plugin.inner.routes.len(), 2);
    }

    #[test]
    fn bad_routes_are_reported() {
        let err = Plugin::builder("p", "P", "1.0.0")
            .on_entry(core_events::Hook::EntryAfterCreate, "greet", |_ctx| async {
                Ok(())
            })
            .api_route("greet", "FETCH", "greet", |_ctx| async {
                Ok(ApiResponse::ok(serde_json::Value::Null))
            })
            .build()
            .expect_err("invalid plugin");
        let msg = err.to_string();
        for needle in [
            "api route 'greet': method 'FETCH' is not one of GET, POST, PUT, PATCH, DELETE",
            "api route 'greet': path 'greet' must start with '/'",
            "api route 'greet': the name is used by a handler",
        ] {
            assert!(msg.contains(needle), "missing {needle:?} in {msg}");
        }
    }
}
