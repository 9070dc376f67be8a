//! The errors devices report to the VMM, each with the class that decides
//! how the VMM reports it further ([`config::ErrorClass`]).

use config::ErrorClass;

use crate::pci::PciError;
use crate::virtio::balloon::BalloonError;
use crate::virtio::block::BlockError;
use crate::virtio::net::NetError;
use crate::virtio::ActivateError;

/// Why a saved device state cannot be restored here.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("the state is for a {found} device, not a {expected} one")]
    WrongKind {
        expected: &'static str,
        found: &'static str,
    },
    /// The state does not fit this device (another disk size, RAM layout,
    /// queue count, ...) or is out of range.
    #[error("{0}")]
    Mismatch(String),
    #[error("cannot restart the device: {0}")]
    Activate(#[from] ActivateError),
    /// The same, naming the device.
    #[error("{id}: {source}")]
    Device {
        id: String,
        #[source]
        source: Box<StateError>,
    },
}

impl StateError {
    /// The same error, naming device `id`.
    pub fn of(self, id: &str) -> StateError {
        StateError::Device {
            id: id.to_string(),
            source: Box::new(self),
        }
    }
}

/// Any device error, as the VMM sees it when it builds, migrates or
/// restores the VM's devices.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error(transparent)]
    Block(#[from] BlockError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error(transparent)]
    Balloon(#[from] BalloonError),
    #[error(transparent)]
    Pci(#[from] PciError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Activate(#[from] ActivateError),
}

impl DeviceError {
    pub fn class(&self) -> ErrorClass {
        match self {
            DeviceError::Block(e) => e.class(),
            DeviceError::Net(e) => e.class(),
            DeviceError::Balloon(e) => e.class(),
            DeviceError::Pci(_) | DeviceError::State(_) | DeviceError::Activate(_) => {
                ErrorClass::Host
            }
        }
    }
}
