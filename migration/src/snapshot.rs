//! State capture: every vCPU and device can give its state as a serde value
//! and take it back, so the migration code walks components instead of
//! knowing each one (as Cloud Hypervisor's `Snapshottable`).

use std::collections::BTreeMap;

use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// Why a state could not be taken or restored.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{id}: state could not be taken: {message}")]
    Take { id: String, message: String },
    #[error("{id}: state is invalid: {message}")]
    Invalid { id: String, message: String },
    #[error("{id}: state is missing from the snapshot")]
    Missing { id: String },
}

/// A component whose state can be saved and restored.
pub trait Snapshottable {
    /// A name unique within the VM (`vcpu0`, `serial`, `disk0`, ...).
    fn snapshot_id(&self) -> String;
    /// Takes the state. The component is expected to be quiescent (vCPUs paused).
    fn snapshot(&mut self) -> Result<serde_json::Value, SnapshotError>;
    /// Puts a state taken by [`Snapshottable::snapshot`] back, validating it.
    fn restore(&mut self, state: serde_json::Value) -> Result<(), SnapshotError>;
}

/// The states of all components of a VM.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub components: BTreeMap<String, serde_json::Value>,
}

impl Snapshot {
    pub fn add(&mut self, component: &mut dyn Snapshottable) -> Result<(), SnapshotError> {
        let state = component.snapshot()?;
        self.components.insert(component.snapshot_id(), state);
        Ok(())
    }

    pub fn restore_into(&self, component: &mut dyn Snapshottable) -> Result<(), SnapshotError> {
        let id = component.snapshot_id();
        let state = self
            .components
            .get(&id)
            .ok_or_else(|| SnapshotError::Missing { id: id.clone() })?;
        component.restore(state.clone())
    }
}

/// Serializes a typed state into the generic form.
pub fn to_value<T: Serialize>(id: &str, state: &T) -> Result<serde_json::Value, SnapshotError> {
    serde_json::to_value(state).map_err(|e| SnapshotError::Take {
        id: id.to_string(),
        message: e.to_string(),
    })
}

/// Parses the generic form back into a typed state.
pub fn from_value<T: DeserializeOwned>(
    id: &str,
    value: serde_json::Value,
) -> Result<T, SnapshotError> {
    serde_json::from_value(value).map_err(|e| SnapshotError::Invalid {
        id: id.to_string(),
        message: e.to_string(),
    })
}
