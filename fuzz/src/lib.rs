//! cargo-fuzz targets for the workspace; the checks they run are in `checks.rs`.

mod checks;
mod quic_checks;
mod session_checks;
mod store_checks;
pub use checks::*;
pub use quic_checks::{broker, broker_quic, broker_shards, quic_server, sessions};
pub use session_checks::{client_session, server_session};
pub use store_checks::broker_store;
