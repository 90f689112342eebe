//! gvfs
