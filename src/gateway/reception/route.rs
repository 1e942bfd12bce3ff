//! Routes: the called AE title a PACS sends to decides where a study goes.
//!
//! A hospital configures one routing rule per destination in its PACS ("send CT for
//! clinic X to CLOUDPDI_X"); each such AE title is a route here, with its own allow-list
//! of calling AE titles and batching rules.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use dicom_ul::association::server::AccessControl;
use dicom_ul::pdu::{AssociationRJServiceUserReason, UserIdentity};

use crate::config::{BatchBy, RouteConfig};

/// One configured route, as the running daemon uses it.
#[derive(Debug, Clone)]
pub struct Route {
    /// The route's name from the configuration (also its spool folder name).
    pub name: String,
    /// The called AE title, without padding.
    pub ae_title: String,
    /// Calling AE titles allowed to send (trimmed); empty means any.
    pub allowed_callers: Vec<String>,
    /// Grouping key of batches.
    pub batch_by: BatchBy,
    /// Quiet period after which a batch is stable.
    pub stable_after: Duration,
}

/// All routes, looked up by called AE title.
#[derive(Debug, Clone, Default)]
pub struct Routes {
    by_ae_title: BTreeMap<String, Arc<Route>>,
}

impl Routes {
    /// Builds the table from validated configuration.
    pub fn new(config: &BTreeMap<String, RouteConfig>) -> Routes {
        let by_ae_title = config
            .iter()
            .map(|(name, route)| {
                let route = Route {
                    name: name.clone(),
                    ae_title: route.ae_title.trim().to_owned(),
                    allowed_callers: route
                        .allowed_callers
                        .iter()
                        .map(|c| c.trim().to_owned())
                        .collect(),
                    batch_by: route.batch_by,
                    stable_after: Duration::from_secs(route.stable_after),
                };
                (route.ae_title.clone(), Arc::new(route))
            })
            .collect();
        Routes { by_ae_title }
    }

    /// The route for a called AE title as it arrives on the wire (padding ignored).
    pub fn by_called(&self, called_ae_title: &str) -> Option<&Arc<Route>> {
        self.by_ae_title.get(called_ae_title.trim())
    }

    /// The route with this configured name.
    pub fn by_name(&self, name: &str) -> Option<&Arc<Route>> {
        self.by_ae_title.values().find(|r| r.name == name)
    }

    /// Every route, in AE title order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Route>> {
        self.by_ae_title.values()
    }

    /// Decides whether `calling` may open an association to `called`.
    ///
    /// # Errors
    /// The A-ASSOCIATE-RJ reason to send back.
    pub fn admit(&self, calling: &str, called: &str) -> Result<&Arc<Route>, Refusal> {
        let route = self.by_called(called).ok_or(Refusal::UnknownCalledAe)?;
        let calling = calling.trim();
        if route.allowed_callers.is_empty() || route.allowed_callers.iter().any(|c| c == calling) {
            Ok(route)
        } else {
            Err(Refusal::CallerNotAllowed)
        }
    }
}

/// Why an association request is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No route has the called AE title.
    UnknownCalledAe,
    /// The route exists but the calling AE title is not on its allow-list.
    CallerNotAllowed,
}

impl Refusal {
    /// Short label for logs and metrics.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::UnknownCalledAe => "called AE title not recognized",
            Refusal::CallerNotAllowed => "calling AE title not allowed on this route",
        }
    }
}

/// The access check handed to dicom-ul for one incoming connection; it logs every refusal
/// with the peer's address so an admin can see who was turned away and why.
pub struct RouteAccess {
    routes: Arc<Routes>,
    peer: SocketAddr,
    on_refusal: Box<dyn Fn(Refusal) + Send + Sync>,
    /// (called, calling) AE titles also admitted: the gateway's import AE title called
    /// by the local PACS with its storage commitment report.
    reports_from: Option<(String, String)>,
}

impl RouteAccess {
    /// Access control for a connection from `peer`; `on_refusal` counts refusals.
    pub fn new(
        routes: Arc<Routes>,
        peer: SocketAddr,
        on_refusal: Box<dyn Fn(Refusal) + Send + Sync>,
    ) -> Self {
        RouteAccess {
            routes,
            peer,
            on_refusal,
            reports_from: None,
        }
    }

    /// Also admits `pacs` calling `ours` (`inbound.calling_ae_title`): the local PACS
    /// sending its storage commitment report on a new association.
    #[must_use]
    pub fn admitting_reports(mut self, ours: &str, pacs: &str) -> Self {
        self.reports_from = Some((ours.trim().to_owned(), pacs.trim().to_owned()));
        self
    }
}

impl AccessControl for RouteAccess {
    fn check_access(
        &self,
        _this_ae_title: &str,
        calling_ae_title: &str,
        called_ae_title: &str,
        _user_identity: Option<&UserIdentity>,
    ) -> Result<(), AssociationRJServiceUserReason> {
        match self.routes.admit(calling_ae_title, called_ae_title) {
            Ok(_) => Ok(()),
            // Not a route this caller may use, but the local PACS with a storage
            // commitment report: admitted for that only (the association decides).
            Err(_)
                if self.reports_from.as_ref().is_some_and(|(ours, pacs)| {
                    ours == called_ae_title.trim() && pacs == calling_ae_title.trim()
                }) =>
            {
                Ok(())
            }
            Err(refusal) => {
                tracing::warn!(
                    peer = %self.peer,
                    calling = calling_ae_title.trim(),
                    called = called_ae_title.trim(),
                    "association rejected: {}",
                    refusal.label()
                );
                (self.on_refusal)(refusal);
                Err(match refusal {
                    Refusal::UnknownCalledAe => {
                        AssociationRJServiceUserReason::CalledAETitleNotRecognized
                    }
                    Refusal::CallerNotAllowed => {
                        AssociationRJServiceUserReason::CallingAETitleNotRecognized
                    }
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes() -> Routes {
        let mut config = BTreeMap::new();
        config.insert(
            "ct".to_owned(),
            RouteConfig {
                ae_title: "CLOUDPDI".into(),
                allowed_callers: vec!["PACS".into()],
                ..RouteConfig::default()
            },
        );
        config.insert(
            "open".to_owned(),
            RouteConfig {
                ae_title: "ANYONE ".into(),
                ..RouteConfig::default()
            },
        );
        Routes::new(&config)
    }

    #[test]
    fn admits_by_called_and_calling_title() {
        let routes = routes();
        assert_eq!(
            routes.admit("PACS  ", "CLOUDPDI ").map(|r| r.name.as_str()),
            Ok("ct")
        );
        assert_eq!(
            routes.admit("EVIL", "CLOUDPDI").map(|r| r.name.as_str()),
            Err(Refusal::CallerNotAllowed)
        );
        assert_eq!(
            routes.admit("PACS", "NOPE").map(|r| r.name.as_str()),
            Err(Refusal::UnknownCalledAe)
        );
        assert_eq!(
            routes.admit("EVIL", "ANYONE").map(|r| r.name.as_str()),
            Ok("open")
        );
    }
}
