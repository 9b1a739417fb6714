//! Following interfaces that go away and come back. A container restart deletes its veth
//! and creates a new one under the same name with a new index; the old attachment died with
//! the old device, and until the new one is attached, replies from behind it reach clients
//! untranslated. The agent listens to the kernel's link notifications and re-attaches the
//! interfaces it was given when they reappear.

use std::path::{Path, PathBuf};

use futures_util::StreamExt as _;
use rtnetlink::{
    MulticastGroup,
    packet_core::NetlinkPayload,
    packet_route::{
        RouteNetlinkMessage,
        link::{LinkAttribute, LinkMessage},
    },
};
use thiserror::Error;
use tokio::sync::mpsc;

use crate::{
    attach::{Link, ModeChoice},
    datapath::{Datapath, PinnedAttachment},
};

#[derive(Debug, Error)]
#[error("subscribing to interface notifications (netlink RTNLGRP_LINK)")]
pub struct SubscribeError(#[source] std::io::Error);

/// An interface appearing (or changing) or going away, by name and index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkChange {
    Present { name: String, index: u32 },
    Gone { name: String, index: u32 },
}

impl LinkChange {
    fn of(message: &LinkMessage, present: bool) -> Option<Self> {
        let name = message.attributes.iter().find_map(|a| match a {
            LinkAttribute::IfName(name) => Some(name.clone()),
            _ => None,
        })?;
        let index = message.header.index;
        Some(if present {
            Self::Present { name, index }
        } else {
            Self::Gone { name, index }
        })
    }
}

/// Subscribes to link notifications in the agent's network namespace; changes arrive on the
/// returned channel until it is dropped. Subscribe before listing and attaching, so a change
/// in between is not missed (handling one twice is harmless).
///
/// # Errors
/// The netlink socket cannot be opened or bound to the group.
pub fn watch() -> Result<mpsc::Receiver<LinkChange>, SubscribeError> {
    let (connection, _handle, mut messages) =
        rtnetlink::new_multicast_connection(&[MulticastGroup::Link]).map_err(SubscribeError)?;
    let (tx, rx) = mpsc::channel(256);
    tokio::spawn(async move {
        let connection = tokio::spawn(connection);
        while let Some((message, _)) = messages.next().await {
            let change = match &message.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) => {
                    LinkChange::of(link, true)
                }
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(link)) => {
                    LinkChange::of(link, false)
                }
                _ => None,
            };
            if let Some(change) = change
                && tx.send(change).await.is_err()
            {
                break;
            }
        }
        connection.abort();
    });
    Ok(rx)
}

/// One interface the agent was given, and its attachment while the device lives.
pub struct Attached {
    pub name: String,
    /// The index of the device the attachment is on.
    pub index: u32,
    pub attachment: Option<PinnedAttachment>,
}

/// The agent's attachments, kept current as interfaces come and go.
pub struct Attachments {
    entries: Vec<Attached>,
    mode: ModeChoice,
    bpffs: PathBuf,
}

impl Attachments {
    #[must_use]
    pub fn new(entries: Vec<Attached>, mode: ModeChoice, bpffs: &Path) -> Self {
        Self {
            entries,
            mode,
            bpffs: bpffs.to_owned(),
        }
    }

    /// The interface `change` shows under a new index (re-created), if it is one of ours.
    #[must_use]
    pub fn recreated(&self, change: &LinkChange) -> Option<(String, u32)> {
        let LinkChange::Present { name, index } = change else {
            return None;
        };
        self.entries
            .iter()
            .any(|e| e.name == *name && e.index != *index)
            .then(|| (name.clone(), *index))
    }

    /// Whether `change` is one of our interfaces going away.
    #[must_use]
    pub fn lost(&self, change: &LinkChange) -> bool {
        matches!(change, LinkChange::Gone { name, index }
            if self.entries.iter().any(|e| e.name == *name && e.index == *index))
    }

    /// Our interfaces whose name now belongs to another index than the one attached to: a
    /// sweep for notifications lost to a full netlink socket.
    #[must_use]
    pub fn moved(&self) -> Vec<(String, u32)> {
        self.entries
            .iter()
            .filter_map(|e| {
                let now = nix::net::if_::if_nametoindex(e.name.as_str()).ok()?;
                (now != e.index).then(|| (e.name.clone(), now))
            })
            .collect()
    }

    /// Attaches to `link`, the new device under one of our names: the old attachment's pin
    /// goes first (its link died with the old device, and a pin in the way would be adopted).
    ///
    /// # Errors
    /// The kernel refusing every hook the mode allows; the interface then stays unattached
    /// until it changes again.
    pub fn reattach(&mut self, datapath: &mut Datapath, link: &Link) -> anyhow::Result<()> {
        let Some(entry) = self.entries.iter_mut().find(|e| e.name == link.name) else {
            return Ok(());
        };
        if let Some(old) = entry.attachment.take()
            && let Err(e) = old.detach()
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(iface = %link.name, "removing the dead attachment's pin: {e}");
        }
        entry.index = link.index;
        entry.attachment = Some(crate::attach::attach(
            datapath,
            link,
            self.mode,
            &self.bpffs,
        )?);
        Ok(())
    }

    /// (name, index) of every interface, for the agent's route checks.
    #[must_use]
    pub fn interfaces(&self) -> Vec<(String, u32)> {
        self.entries
            .iter()
            .map(|e| (e.name.clone(), e.index))
            .collect()
    }

    /// Each interface with the hook it has now (none while it is gone).
    #[must_use]
    pub fn hooks(&self) -> Vec<crate::api::InterfaceStatus> {
        self.entries
            .iter()
            .map(|e| crate::api::InterfaceStatus {
                name: e.name.clone(),
                index: e.index,
                hook: e.attachment.as_ref().map(|a| a.hook.name().to_owned()),
            })
            .collect()
    }

    /// The live attachments, for the agent's stop.
    #[must_use]
    pub fn into_attachments(self) -> Vec<PinnedAttachment> {
        self.entries
            .into_iter()
            .filter_map(|e| e.attachment)
            .collect()
    }
}
