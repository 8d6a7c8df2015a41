#[derive(serde::Deserialize)]
struct Order {}

#[kcl::handler]
fn handle(order: Order) -> Result<(), std::io::Error> {
    let _ = order;
    Ok(())
}

fn main() {}
