//! Device models. Each device is a plain struct driven by the VMM through a
//! small set of traits ([`bus::BusDevice`]) with its interrupt line behind a
//! tiny trait, so it is testable without KVM.

pub mod bus;
pub mod legacy;
