//! The broker's state that outlives connections: subscriptions and routing, retained messages
//! (more to come: wills, session store, limits, authentication).

pub mod retained;
pub mod router;
