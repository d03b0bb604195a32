//! The dispatcher: takes events from a durable consumer on the events stream and
//! calls each matching handler in order.
//!
//! - Handlers for one event run one after another: priority, then the plugin's
//!   position in `ENABLED_PLUGINS`, then declaration order.
//! - Events about one object (an entry, or an entity for entity hooks) are
//!   dispatched in stream order; other objects proceed in parallel, up to
//!   [`DispatcherSettings::max_parallel_objects`].
//! - An event is acked only when every handler has succeeded, been dead-lettered,
//!   or been deferred (its plugin has no replica: see [`deferred`]). A crash at any
//!   point means redelivery, never loss.
//! - The dispatcher reads only the subject and headers of an event; the payload
//!   goes to handlers untouched.
//! - On NATS 2.11 and newer the dispatcher consumers are pinned-client consumers
//!   (priority group [`PIN_GROUP`]): the server delivers to one pull client at a
//!   time, so even two buses that both believe they hold a partition's lease (one
//!   that lost it and has not noticed yet) never dispatch it at once. A dispatcher
//!   unpins when it starts (taking over from a dead holder at once) and when it
//!   stops (handing over at once); the KV lease still decides who runs.
//!
//! | concern | module |
//! |---|---|
//! | what every task of a dispatcher shares (`Ctx`), dead letters | `ctx` |
//! | what the dispatcher reads of an event (`EventMeta`) | `event` |
//! | partitions, their pinned-client consumers | [`partition`] |
//! | sharing the partitions among buses by leases | `share` |
//! | the consumer loop: lanes, the handler chain, acks | `consumer` |
//! | holding at start-up, progress acks, giving back at stop | `hold` |
//! | one delivery: request, retries, dead letters | `deliver` |
//! | deferral of deliveries for a plugin with no replica | [`deferred`] |

mod consumer;
mod ctx;
mod deferred;
pub(crate) mod deliver;
mod event;
mod hold;
pub mod partition;
pub(crate) mod share;

pub use consumer::{DispatchError, Dispatcher};
pub use partition::{PIN_GROUP, PIN_TIMEOUT, Partition, supports_pinning};
