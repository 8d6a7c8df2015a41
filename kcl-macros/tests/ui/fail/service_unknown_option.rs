#[kcl::handler(bytes)]
async fn handle(data: bytes::Bytes) {
    let _ = data;
}

kcl::service!(handle, application = "orders-app");
