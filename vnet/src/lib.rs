//! vnet
