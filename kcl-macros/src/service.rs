//! `kcl::service!(handle, option = value, …)`: a `main` that runs `kcl::service::Service`.

use proc_macro2::{Span, TokenStream};
use quote::{quote, quote_spanned};
use syn::parse::Parser;
use syn::punctuated::Punctuated;
use syn::spanned::Spanned;
use syn::{Expr, Token};

/// The options, and the `Service` method each one calls.
const OPTIONS: [(&str, &str); 4] = [
    ("app", "default_app"),
    ("stream", "default_stream"),
    ("table", "default_table"),
    ("position", "default_position"),
];

pub(crate) fn expand(input: TokenStream) -> TokenStream {
    match expand_inner(input) {
        Ok(out) => out,
        Err(e) => e.to_compile_error(),
    }
}

fn expand_inner(input: TokenStream) -> syn::Result<TokenStream> {
    let usage = "kcl::service! takes the name of a #[kcl::handler] function, then options: \
                 `kcl::service!(handle)` or `kcl::service!(handle, app = \"orders-app\")`";
    let exprs = Punctuated::<Expr, Token![,]>::parse_terminated.parse2(input)?;
    let mut exprs = exprs.into_iter();
    let handler = match exprs.next() {
        Some(Expr::Path(p)) if p.qself.is_none() && p.attrs.is_empty() => p.path,
        Some(other) => return Err(syn::Error::new_spanned(other, usage)),
        None => return Err(syn::Error::new(Span::call_site(), usage)),
    };
    let mut calls = Vec::new();
    let mut seen: Vec<String> = Vec::new();
    for expr in exprs {
        let Expr::Assign(assign) = &expr else {
            return Err(syn::Error::new_spanned(
                &expr,
                "expected `option = value`; the options are `app`, `stream`, `table` (default \
                 values of --app, --stream, --table) and `position` (a kcl::InitialPosition)",
            ));
        };
        let key = match &*assign.left {
            Expr::Path(p) => p.path.get_ident().map(ToString::to_string),
            _ => None,
        };
        let Some(key) = key else {
            return Err(syn::Error::new_spanned(
                &assign.left,
                "expected an option name",
            ));
        };
        let Some((_, method)) = OPTIONS.iter().find(|(k, _)| *k == key) else {
            return Err(syn::Error::new_spanned(
                &assign.left,
                format!("unknown option `{key}`: expected `app`, `stream`, `table` or `position`"),
            ));
        };
        if seen.contains(&key) {
            return Err(syn::Error::new_spanned(
                &assign.left,
                format!("`{key}` is given twice"),
            ));
        }
        seen.push(key);
        let method = syn::Ident::new(method, assign.left.span());
        let value = &assign.right;
        calls.push(quote!(.#method(#value)));
    }
    let factory = quote_spanned! {handler.span()=> #handler::factory()};
    Ok(quote! {
        fn main() -> ::std::process::ExitCode {
            let program = match ::core::option_env!("CARGO_BIN_NAME") {
                ::core::option::Option::Some(name) => name,
                ::core::option::Option::None => ::core::env!("CARGO_PKG_NAME"),
            };
            ::kcl::service::Service::new(#factory)
                .program(program, ::core::env!("CARGO_PKG_VERSION"))
                #(#calls)*
                .run()
        }
    })
}
