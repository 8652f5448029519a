//! A small mTLS client of the federation service, used by the trainer and by tests.
use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use crate::v1::federation_client::FederationClient as RawClient;
use crate::{
    ChunkError, DEFAULT_CHUNK_ELEMS, GetGlobalModelRequest, GetRoundStatusRequest, MAX_MESSAGE_BYTES,
    ModelHeader, RoundStatus, SubmitUpdateResponse, UpdateChunk, UpdateHeader, Vector, VectorAssembler,
    f32_chunks, model_chunk, sha256_f32, update_chunk,
};

/// A client's TLS material, PEM encoded.
#[derive(Debug, Clone)]
pub struct ClientTls {
    /// The study CA certificate (what the server's certificate must chain to).
    pub ca_pem: String,
    /// This hospital's certificate and key.
    pub cert_pem: String,
    pub key_pem: String,
    /// The name to verify in the server certificate (a DNS SAN such as `localhost`, or an IP SAN).
    pub server_name: String,
}

/// Errors of the federation client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid aggregator address {addr:?}: {reason}")]
    Address { addr: String, reason: String },
    #[error("cannot connect to the aggregator at {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("aggregator refused: {} ({})", .0.message(), code_name(.0.code()))]
    Status(#[from] tonic::Status),
    #[error("global model stream: {0}")]
    Chunk(#[from] ChunkError),
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl ClientError {
    /// The gRPC status code, when the server answered with one.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            ClientError::Status(s) => Some(s.code()),
            _ => None,
        }
    }

    /// Whether retrying later may help (the server is down or restarting).
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Connect { .. } => true,
            ClientError::Status(s) => matches!(
                s.code(),
                tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
            ),
            _ => false,
        }
    }
}

fn code_name(code: tonic::Code) -> String {
    format!("{code:?}")
}

/// The global model of one round, reassembled and checked against its digest.
#[derive(Debug, Clone)]
pub struct GlobalModel {
    pub header: ModelHeader,
    pub params: Vec<f32>,
    /// SCAFFOLD's server control variate.
    pub control: Option<Vec<f32>>,
}

/// An mTLS client of one study's aggregator.
#[derive(Debug, Clone)]
pub struct FederationClient {
    inner: RawClient<Channel>,
    study_id: String,
    addr: String,
}

impl FederationClient {
    /// Connects to `addr` (`host:port`, or a full `https://` URL) with mutual TLS.
    pub async fn connect(addr: &str, tls: &ClientTls, study_id: &str) -> Result<Self, ClientError> {
        let url = if addr.starts_with("https://") {
            addr.to_string()
        } else if addr.starts_with("http://") {
            return Err(ClientError::Address {
                addr: addr.into(),
                reason: "plaintext http is not allowed; the aggregator speaks mTLS only".into(),
            });
        } else {
            format!("https://{addr}")
        };
        let bad = |reason: String| ClientError::Address {
            addr: addr.into(),
            reason,
        };
        let tls_cfg = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&tls.ca_pem))
            .identity(Identity::from_pem(&tls.cert_pem, &tls.key_pem))
            .domain_name(tls.server_name.clone());
        let endpoint = Channel::from_shared(url)
            .map_err(|e| bad(e.to_string()))?
            .tls_config(tls_cfg)
            .map_err(|e| bad(e.to_string()))?
            .connect_timeout(Duration::from_secs(10))
            .tcp_nodelay(true);
        let channel = endpoint.connect().await.map_err(|source| ClientError::Connect {
            addr: addr.into(),
            source,
        })?;
        let inner = RawClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        Ok(Self {
            inner,
            study_id: study_id.into(),
            addr: addr.into(),
        })
    }

    /// The address this client talks to.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The study's progress; with `wait_for_round`, a long poll of at most `wait`.
    pub async fn status(
        &mut self,
        wait_for_round: Option<u32>,
        wait: Duration,
    ) -> Result<RoundStatus, ClientError> {
        let req = GetRoundStatusRequest {
            study_id: self.study_id.clone(),
            wait_for_round,
            wait_timeout_ms: wait.as_millis().min(u32::MAX as u128) as u32,
        };
        Ok(self.inner.get_round_status(req).await?.into_inner())
    }

    /// Downloads round `round`'s global model and checks its length and digest.
    pub async fn fetch_model(&mut self, round: u32) -> Result<GlobalModel, ClientError> {
        let req = GetGlobalModelRequest {
            study_id: self.study_id.clone(),
            round,
        };
        let mut stream = self.inner.get_global_model(req).await?.into_inner();
        let header = match stream.message().await? {
            Some(crate::ModelChunk {
                kind: Some(model_chunk::Kind::Header(h)),
            }) => h,
            _ => {
                return Err(ClientError::Protocol(
                    "the model stream did not start with a header".into(),
                ));
            }
        };
        let n = header.num_parameters;
        let mut params = VectorAssembler::new(Vector::Parameters, n);
        let mut control = header
            .has_control
            .then(|| VectorAssembler::new(Vector::Control, n));
        while let Some(msg) = stream.message().await? {
            let Some(model_chunk::Kind::Data(chunk)) = msg.kind else {
                return Err(ClientError::Protocol(
                    "a second header in the model stream".into(),
                ));
            };
            if chunk.vector == Vector::Control as i32 {
                match control.as_mut() {
                    Some(c) => c.push(&chunk)?,
                    None => {
                        return Err(ClientError::Protocol(
                            "control-variate chunk in a model without one".into(),
                        ));
                    }
                }
            } else {
                params.push(&chunk)?;
            }
        }
        let params = params.finish()?;
        let control = control.map(VectorAssembler::finish).transpose()?;
        let digest = sha256_f32(&params);
        if digest != header.parameters_sha256 {
            return Err(ClientError::Protocol(format!(
                "global model digest mismatch: header says {}, received data hashes to {digest}",
                header.parameters_sha256
            )));
        }
        Ok(GlobalModel {
            header,
            params,
            control,
        })
    }

    /// Sends an update: the header, then the parameter delta and (SCAFFOLD) the control delta in
    /// chunks. `header.num_parameters` and `header.has_control` are filled in from the vectors.
    pub async fn submit(
        &mut self,
        mut header: UpdateHeader,
        params: Option<&[f32]>,
        control: Option<&[f32]>,
    ) -> Result<SubmitUpdateResponse, ClientError> {
        header.study_id = self.study_id.clone();
        header.num_parameters = params.map_or(0, |p| p.len() as u64);
        header.has_control = control.is_some();
        let mut msgs = Vec::with_capacity(
            1 + params.map_or(0, |p| p.len() / DEFAULT_CHUNK_ELEMS + 1)
                + control.map_or(0, |c| c.len() / DEFAULT_CHUNK_ELEMS + 1),
        );
        msgs.push(UpdateChunk {
            kind: Some(update_chunk::Kind::Header(header)),
        });
        for (vector, values) in [(Vector::Parameters, params), (Vector::Control, control)] {
            if let Some(values) = values {
                msgs.extend(
                    f32_chunks(vector, values, DEFAULT_CHUNK_ELEMS).map(|c| UpdateChunk {
                        kind: Some(update_chunk::Kind::Data(c)),
                    }),
                );
            }
        }
        Ok(self
            .inner
            .submit_update(futures::stream::iter(msgs))
            .await?
            .into_inner())
    }

    /// Sends an arbitrary sequence of update messages (for tests of the server's checks).
    pub async fn submit_raw(&mut self, msgs: Vec<UpdateChunk>) -> Result<SubmitUpdateResponse, ClientError> {
        Ok(self
            .inner
            .submit_update(futures::stream::iter(msgs))
            .await?
            .into_inner())
    }
}
