//! The broker's state that outlives connections: subscriptions and routing (more to come:
//! retained messages, wills, session store, limits, authentication).

pub mod router;
