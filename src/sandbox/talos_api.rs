//! The simulated Talos API: to be written.
