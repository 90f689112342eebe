//! The test bed the benchmark shares ([`vnet::testbed`]): namespaces
//! removed on drop even when a test fails, TAPs, ping, iperf3, a PKI.
#![allow(unused_imports)]

pub use vnet::testbed::*;
