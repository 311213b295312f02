//! Change data capture on relay-outer: the store that receives each source's log through
//! the tunnel, and the sinks that apply it.

pub mod sink_pg;
pub mod store;
