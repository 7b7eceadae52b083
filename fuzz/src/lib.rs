//! cargo-fuzz targets for the workspace; the checks they run are in `checks.rs`.

mod checks;
pub use checks::*;
