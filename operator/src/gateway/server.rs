//! The `SiteGateway` gRPC service. `Enrol` needs no client certificate (the join token is the
//! proof); `Session` needs one from the sites CA, and the hospital is what that certificate names,
//! while its enrolment record exists and names that very certificate.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use caduceus_proto::v1::site_gateway_server::{SiteGateway, SiteGatewayServer};
use caduceus_proto::v1::{
    CoordinatorMessage, EnrolRequest, EnrolResponse, SiteHello, SiteMessage, site_message,
};
use futures::Stream;
use tokio::sync::mpsc;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status, Streaming};

use super::enrol::{self, Refusal};
use super::{Gateway, keys, mirror};
use crate::context::Context;

/// How often the gateway checks that each connected site is still enrolled.
const REVOCATION_CHECK: Duration = Duration::from_secs(3);

struct Service {
    gw: Arc<Gateway>,
    ctx: Arc<Context>,
}

type SessionStream = Pin<Box<dyn Stream<Item = Result<CoordinatorMessage, Status>> + Send>>;

/// The hospital and certificate hash of a request's verified client certificate.
fn peer<T>(req: &Request<T>) -> Result<(String, String), Status> {
    let certs = req.peer_certs().ok_or_else(|| {
        Status::unauthenticated("no client certificate: a session needs the site's enrolled certificate")
    })?;
    let leaf = certs
        .first()
        .ok_or_else(|| Status::unauthenticated("empty client certificate chain"))?;
    let hospital = caduceus_pki::hospital_from_cert_der(leaf.as_ref())
        .map_err(|e| Status::permission_denied(format!("client certificate: {e}")))?;
    Ok((hospital, enrol::cert_sha256(leaf.as_ref())))
}

fn study_keys(h: &SiteHello) -> BTreeMap<String, String> {
    h.study_keys.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

#[tonic::async_trait]
impl SiteGateway for Service {
    async fn enrol(&self, req: Request<EnrolRequest>) -> Result<Response<EnrolResponse>, Status> {
        let r = req.into_inner();
        let opns = &self.ctx.settings.operator_namespace;
        match enrol::enrol(&self.ctx.client, opns, &r.token, &r.csr_pem).await {
            Ok((hospital, cert_pem, ca_pem)) => Ok(Response::new(EnrolResponse {
                hospital,
                cert_pem,
                ca_pem,
            })),
            Err(Refusal::Api(e)) => {
                tracing::warn!("enrolment: {e}");
                Err(Status::unavailable(format!("enrolment failed: {e}")))
            }
            Err(e) => {
                tracing::warn!("enrolment refused: {e}");
                Err(Status::permission_denied(e.to_string()))
            }
        }
    }

    type SessionStream = SessionStream;

    async fn session(&self, req: Request<Streaming<SiteMessage>>) -> Result<Response<SessionStream>, Status> {
        let (hospital, fp) = peer(&req)?;
        let (client, opns) = (
            self.ctx.client.clone(),
            self.ctx.settings.operator_namespace.clone(),
        );
        let sites_ns = self.gw.cfg.sites_namespace.clone();
        match enrol::is_enrolled(&client, &opns, &hospital, &fp).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(hospital, "refused a session: no enrolment for this certificate");
                return Err(Status::permission_denied(format!(
                    "hospital {hospital} is not enrolled with this certificate (removed, or enrolled again since)"
                )));
            }
            Err(e) => return Err(Status::unavailable(e.to_string())),
        }
        let mut inbound = req.into_inner();
        let hello = match inbound.message().await? {
            Some(SiteMessage {
                body: Some(site_message::Body::Hello(h)),
            }) => h,
            _ => return Err(Status::invalid_argument("a session starts with SiteHello")),
        };
        mirror::upsert(
            &client,
            &sites_ns,
            &hospital,
            &hello.hospital_spec_json,
            &hello.labels.clone().into_iter().collect(),
            hello.ready,
        )
        .await
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let (tx, rx) = mpsc::channel(256);
        let conn = self.gw.register(
            &hospital,
            &fp,
            tx,
            hello.seal_public_key.clone(),
            study_keys(&hello),
        );
        tracing::info!(
            hospital,
            conn,
            assignments = hello.assignments.len(),
            "site connected"
        );
        for s in hello.assignments {
            if let Err(e) = self.gw.record(&hospital, s) {
                tracing::warn!(hospital, "ignored an assignment report: {e}");
            }
        }
        self.gw.wake_rounds_of(&hospital);
        let gw = self.gw.clone();
        tokio::spawn(async move {
            loop {
                let msg = match inbound.message().await {
                    Ok(Some(m)) => m,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::info!(hospital, "site stream ended: {e}");
                        break;
                    }
                };
                match msg.body {
                    Some(site_message::Body::Hello(h)) => {
                        gw.update_hello(&hospital, h.seal_public_key.clone(), study_keys(&h));
                        if let Err(e) = mirror::upsert(
                            &client,
                            &sites_ns,
                            &hospital,
                            &h.hospital_spec_json,
                            &h.labels.clone().into_iter().collect(),
                            h.ready,
                        )
                        .await
                        {
                            tracing::warn!(hospital, "mirror update: {e}");
                        }
                        for s in h.assignments {
                            let _ = gw.record(&hospital, s);
                        }
                    }
                    Some(site_message::Body::State(s)) => {
                        tracing::info!(hospital, id = s.assignment_id, phase = ?s.phase(), message = s.message, "assignment report");
                        if let Err(e) = gw.record(&hospital, s) {
                            tracing::warn!(hospital, "ignored an assignment report: {e}");
                        }
                    }
                    Some(site_message::Body::SealedKeys(k)) => {
                        gw.key_answered(&k.study_id);
                        match keys::store(&client, &opns, &hospital, &k).await {
                            Ok(()) => tracing::info!(
                                hospital,
                                study = k.study_id,
                                sealed = k.keys.len(),
                                "stored sealed study keys"
                            ),
                            Err(e) => tracing::warn!(hospital, "sealed keys refused: {e}"),
                        }
                        gw.wake_rounds_of(&hospital);
                        for h in gw.connected_sites() {
                            gw.wake_rounds_of(&h);
                        }
                    }
                    None => {}
                }
            }
            if gw.unregister(&hospital, conn) {
                tracing::info!(hospital, conn, "site disconnected");
                if let Err(e) = mirror::mark_disconnected(&client, &sites_ns, &hospital).await {
                    tracing::warn!(hospital, "mirror: {e}");
                }
                gw.wake_rounds_of(&hospital);
            }
        });
        let out = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
        Ok(Response::new(Box::pin(out)))
    }
}

/// Cuts the stream of every connected site whose enrolment record is gone or names another
/// certificate (a removed hospital; its certificate is refused at its next session too).
async fn revocations(gw: Arc<Gateway>, ctx: Arc<Context>) {
    let opns = ctx.settings.operator_namespace.clone();
    loop {
        tokio::time::sleep(REVOCATION_CHECK).await;
        for (h, fp) in gw.connected_fingerprints() {
            if let Ok(false) = enrol::is_enrolled(&ctx.client, &opns, &h, &fp).await
                && gw.disconnect(&h, &format!("hospital {h} was removed from the coordinator"))
            {
                tracing::warn!(hospital = h, "cut the stream of a removed site");
            }
        }
    }
}

/// Serves the gateway until `stop` turns true.
///
/// # Errors
/// The sites CA cannot be read or made, the listener cannot bind, or TLS cannot be configured.
pub async fn serve(
    gw: Arc<Gateway>,
    ctx: Arc<Context>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let ca = enrol::ensure_sites_ca(&ctx.client, &ctx.settings.operator_namespace).await?;
    let cert = enrol::gateway_certificate(&ca, &gw.cfg.server_names)?;
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(&cert.cert_pem, &cert.key_pem))
        .client_ca_root(Certificate::from_pem(ca.cert_pem()))
        // Enrol has no certificate yet; Session refuses a request without one.
        .client_auth_optional(true);
    let svc = SiteGatewayServer::new(Service {
        gw: gw.clone(),
        ctx: ctx.clone(),
    });
    tokio::spawn(revocations(gw.clone(), ctx.clone()));
    let listener = tokio::net::TcpListener::bind(gw.cfg.listen).await?;
    tracing::info!(addr = %listener.local_addr()?, address = gw.cfg.address, "site gateway listening (TLS)");
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    Server::builder()
        .tls_config(tls)?
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .add_service(svc)
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await?;
    Ok(())
}
