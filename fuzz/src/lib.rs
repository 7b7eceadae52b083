//! cargo-fuzz targets for the workspace; the checks they run are in `checks.rs`.

mod checks;
mod quic_checks;
pub use checks::*;
pub use quic_checks::{broker, quic_server, sessions};
