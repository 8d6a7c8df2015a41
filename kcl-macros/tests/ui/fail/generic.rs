#[kcl::handler]
async fn handle<T: serde::de::DeserializeOwned>(order: T) {
    let _ = order;
}

fn main() {}
