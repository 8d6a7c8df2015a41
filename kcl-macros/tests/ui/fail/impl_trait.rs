#[kcl::handler]
async fn handle(order: impl serde::de::DeserializeOwned) {
    let _ = order;
}

fn main() {}
