//! relay-inner's side of the tunnel: dialing each relay-outer endpoint and keeping a
//! session up ([`dialer`]), the services a session may open streams to ([`services`]),
//! and each endpoint's state and live session ([`endpoint`]).

pub mod dialer;
pub mod endpoint;
pub mod services;
