//! Enhanced fan-out through HTTP/2 over TLS, as AWS serves it: kinesis-local's TLS port with a
//! CA and a server certificate made here (subject alternative names `DNS:localhost` and
//! `IP:127.0.0.1`), an SDK client whose HTTP client trusts that CA only, and
//! `AwsKinesis::register_stream_consumer` + `subscribe_to_shard` receiving the records put
//! after subscribing, then a resubscription `AFTER_SEQUENCE_NUMBER` the last continuation.
//!
//! kinesis-local pushes fan-out events only about once a second and never ends a subscription
//! at a shard's end (the in-memory backend tests that), so this test stays small.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use aws_sdk_kinesis::Client;
use aws_smithy_http_client::tls::{self, TlsContext, TrustStore};
use futures::StreamExt;
use kcl::retrieval::aws::AwsKinesis;
use kcl::retrieval::kinesis::SubscriptionStream;
use kcl::retrieval::IteratorPosition;
use kcl::{KinesisApi, KinesisApiError, Record, SequenceNumber};
use kcl_integration_tests::kinesis_server::{create_stream, put_records, start_kinesis_local_tls};
use kcl_integration_tests::unique_name;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// A CA and a server certificate it signed, in PEM.
struct TestPki {
    ca_cert: String,
    server_cert: String,
    server_key: String,
}

impl TestPki {
    fn new() -> anyhow::Result<Self> {
        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "kcl fan-out test CA");
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca, ca_key);

        let server_key = KeyPair::generate()?;
        // `new` makes "127.0.0.1" an IP address name and "localhost" a DNS name.
        let mut server = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])?;
        server
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        server.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_cert = server.signed_by(&server_key, &issuer)?;
        Ok(Self {
            ca_cert: ca_cert.pem(),
            server_cert: server_cert.pem(),
            server_key: server_key.serialize_pem(),
        })
    }

    /// kinesis-local's certificate file: `{"server":{"key":"<PEM>","cert":"<PEM>"}}`.
    fn write_kinesis_local_cert(&self, dir: &std::path::Path) -> anyhow::Result<PathBuf> {
        let path = dir.join("server.json");
        let json = serde_json::json!({
            "server": { "key": self.server_key, "cert": self.server_cert }
        });
        std::fs::write(&path, serde_json::to_vec_pretty(&json)?)
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }
}

/// An SDK client for `endpoint` whose HTTPS client trusts `ca_pem` and nothing else.
async fn client_trusting(endpoint: &str, ca_pem: &str) -> anyhow::Result<Client> {
    let trust = TrustStore::empty().with_pem_certificate(ca_pem.as_bytes());
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(
            tls::rustls_provider::CryptoMode::AwsLc,
        ))
        .tls_context(TlsContext::builder().with_trust_store(trust).build()?)
        .build_https();
    let conf = kcl_integration_tests::sdk_loader(endpoint)
        .http_client(http)
        .load()
        .await;
    Ok(Client::new(&conf))
}

/// Subscribes from `position` and reads events until `n` records arrived (30 s at most);
/// returns them and the last continuation sequence number. A subscription that fails before
/// delivering a record with a retryable error (kinesis-local, like AWS, refuses a
/// subscription made too soon after the previous one of the same consumer and shard, with
/// `ResourceInUseException` in the event stream) is made again a second later, for up to 60 s.
async fn subscribe_and_receive(
    kinesis: &AwsKinesis,
    arn: &str,
    shard: &kcl::ShardId,
    position: IteratorPosition,
    n: usize,
) -> anyhow::Result<(Vec<Record>, SequenceNumber)> {
    let started = tokio::time::Instant::now();
    let deadline = started + Duration::from_secs(60);
    loop {
        let received = match kinesis.subscribe_to_shard(arn, shard, &position).await {
            Ok(mut events) => receive(&mut events, n).await?,
            Err(e) => Err((e, 0)),
        };
        match received {
            Ok(got) => {
                println!("subscribed in {:?}", started.elapsed());
                return Ok(got);
            }
            Err((e, 0)) if e.is_retryable() && tokio::time::Instant::now() < deadline => {
                println!("subscription refused ({e}); again in 1 s");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err((e, delivered)) => bail!("subscription failed after {delivered} records: {e:?}"),
        }
    }
}

/// Reads events until `n` records arrived (30 s at most): the records and the last
/// continuation, or the stream's error and how many records came before it.
async fn receive(
    events: &mut SubscriptionStream,
    n: usize,
) -> anyhow::Result<Result<(Vec<Record>, SequenceNumber), (KinesisApiError, usize)>> {
    let mut records = Vec::new();
    let mut continuation = None;
    let read = async {
        while records.len() < n {
            match events.next().await {
                Some(Ok(event)) => {
                    records.extend(event.records);
                    continuation = Some(
                        event
                            .continuation_sequence_number
                            .context("an open shard's event has a continuation")?,
                    );
                }
                Some(Err(e)) => return Ok(Err((e, records.len()))),
                None => bail!("subscription ended after {} records", records.len()),
            }
        }
        Ok(Ok(()))
    };
    let outcome = tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .with_context(|| format!("waiting for {n} records"))??;
    Ok(outcome.map(|()| (records, continuation.expect("an event arrived"))))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_over_http2_and_tls() -> anyhow::Result<()> {
    let pki = TestPki::new()?;
    let dir = std::env::temp_dir().join(unique_name("kcl-fanout-tls"));
    std::fs::create_dir_all(&dir)?;
    let cert_path = pki.write_kinesis_local_cert(&dir)?;
    let server = start_kinesis_local_tls(&cert_path).await?;
    let endpoint = server.https_endpoint();

    // A client that trusts another CA is refused: the certificate really is checked.
    let stranger = TestPki::new()?;
    let untrusting = AwsKinesis::new(client_trusting(&endpoint, &stranger.ca_cert).await?);
    match untrusting.list_shards("any").await {
        Err(KinesisApiError::Transient(_)) => {}
        other => bail!("a client not trusting the CA got {other:?}"),
    }

    let client = client_trusting(&endpoint, &pki.ca_cert).await?;
    let stream = unique_name("fanout-tls");
    create_stream(&client, &stream, 1).await?;
    let kinesis = AwsKinesis::new(client.clone());
    let arn = kinesis
        .register_stream_consumer(&stream, "kcl-fanout-test")
        .await?;
    ensure!(arn.contains("kcl-fanout-test"), "consumer ARN {arn}");
    // Registering again finds the same consumer.
    ensure!(
        kinesis
            .register_stream_consumer(&stream, "kcl-fanout-test")
            .await?
            == arn,
        "a second registration returned another ARN"
    );
    let shard = kinesis.list_shards(&stream).await?[0].id.clone();

    let data = |prefix: &str, n: usize| -> Vec<(String, Vec<u8>)> {
        (0..n)
            .map(|i| (format!("key-{i}"), format!("{prefix}-{i}").into_bytes()))
            .collect()
    };
    let puts = put_records(&client, &stream, data("first", 20)).await?;
    let (records, continuation) =
        subscribe_and_receive(&kinesis, &arn, &shard, IteratorPosition::TrimHorizon, 20).await?;
    println!(
        "first subscription: {} records, continuation {continuation}",
        records.len()
    );
    let got: Vec<_> = records.iter().map(|r| r.sequence_number.clone()).collect();
    let mut want: Vec<_> = puts.iter().map(|p| p.sequence_number.clone()).collect();
    want.sort();
    ensure!(got == want, "received {got:?}, put {want:?}");
    ensure!(
        records
            .iter()
            .all(|r| String::from_utf8_lossy(&r.data).starts_with("first-")),
        "unexpected payloads"
    );
    ensure!(
        continuation >= *want.last().expect("20 records"),
        "continuation {continuation} is before the last record"
    );

    // Resubscribing after the continuation delivers only what came later.
    let later = put_records(&client, &stream, data("later", 5)).await?;
    let (records, _) = subscribe_and_receive(
        &kinesis,
        &arn,
        &shard,
        IteratorPosition::AfterSequence(continuation.clone()),
        5,
    )
    .await?;
    let got: Vec<_> = records.iter().map(|r| r.sequence_number.clone()).collect();
    let mut want: Vec<_> = later.iter().map(|p| p.sequence_number.clone()).collect();
    want.sort();
    ensure!(
        got == want,
        "after resubscribing: received {got:?}, put {want:?}"
    );

    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
