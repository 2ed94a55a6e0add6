//! Read-only D-Bus gateway (zbus): being written.
