//! Certificate tooling (being written).
