//! `#[kcl::handler]`: checks the function's signature, then emits a struct of the same name
//! (in the type namespace only, so the function stays callable) implementing
//! `kcl::service::Handler`, with `factory()`.

use proc_macro2::{Span, TokenStream};
use quote::{quote, quote_spanned, ToTokens};
use syn::parse::Parser;
use syn::punctuated::Punctuated;
use syn::spanned::Spanned;
use syn::visit_mut::VisitMut;
use syn::{
    Expr, FnArg, GenericArgument, Ident, ItemFn, Lifetime, PathArguments, ReturnType, Token, Type,
};

/// The codecs `#[kcl::handler(…)]` accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Codec {
    Json,
    Raw,
    Text,
}

impl Codec {
    fn path(self) -> TokenStream {
        match self {
            Self::Json => quote!(::kcl::service::codec::Json),
            Self::Raw => quote!(::kcl::service::codec::Raw),
            Self::Text => quote!(::kcl::service::codec::Text),
        }
    }
}

/// One record per call, or a batch (`Vec<T>` or `&[T]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shape {
    Record,
    Batch { by_ref: bool },
}

/// What a record type looks like, syntactically (for choosing and checking the codec).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// `Bytes`, `Vec<u8>`, `&[u8]`.
    Raw,
    /// `&str`.
    Str,
    /// `String`.
    String,
    /// Anything else (JSON, or an alias the type checker will judge).
    Other,
}

pub(crate) fn expand(args: TokenStream, item: TokenStream) -> TokenStream {
    let func: ItemFn = match syn::parse2(item.clone()) {
        Ok(f) => f,
        Err(_) => {
            let mut out = syn::Error::new_spanned(
                &item,
                "#[kcl::handler] goes on an `async fn` that takes a record, e.g. \
                 `async fn handle(order: Order) -> Result<(), MyError>`",
            )
            .to_compile_error();
            out.extend(item);
            return out;
        }
    };
    match expand_fn(args, &func) {
        Ok(out) => out,
        Err(e) => {
            // The function stays as it was, so that its other uses do not fail too.
            let mut out = e.to_compile_error();
            out.extend(func.into_token_stream());
            out
        }
    }
}

fn parse_codec(args: TokenStream) -> syn::Result<Option<Codec>> {
    let exprs = Punctuated::<Expr, Token![,]>::parse_terminated.parse2(args)?;
    let mut codec = None;
    for (i, expr) in exprs.iter().enumerate() {
        if i > 0 {
            return Err(syn::Error::new_spanned(
                expr,
                "#[kcl::handler] takes one codec: `json`, `bytes` or `text`",
            ));
        }
        codec = Some(match expr {
            Expr::Path(p) if p.path.get_ident().is_some() => {
                let ident = p.path.get_ident().map(Ident::to_string).unwrap_or_default();
                match ident.as_str() {
                    "json" => Codec::Json,
                    "bytes" => Codec::Raw,
                    "text" => Codec::Text,
                    other => {
                        return Err(syn::Error::new_spanned(
                            expr,
                            format!(
                                "unknown codec `{other}`: expected `json` (serde_json, the \
                                 default), `bytes` (the raw payload) or `text` (UTF-8)"
                            ),
                        ))
                    }
                }
            }
            Expr::Lit(_) => {
                return Err(syn::Error::new_spanned(
                    expr,
                    "write the codec as a bare word: #[kcl::handler(json)], \
                     #[kcl::handler(bytes)] or #[kcl::handler(text)]",
                ))
            }
            _ => {
                return Err(syn::Error::new_spanned(
                    expr,
                    "expected a codec: #[kcl::handler(json)], #[kcl::handler(bytes)] or \
                     #[kcl::handler(text)]",
                ))
            }
        });
    }
    Ok(codec)
}

fn expand_fn(args: TokenStream, func: &ItemFn) -> syn::Result<TokenStream> {
    let codec = parse_codec(args)?;
    let sig = &func.sig;
    let name = &sig.ident;
    if let Some(c) = &sig.constness {
        return Err(syn::Error::new_spanned(
            c,
            "a #[kcl::handler] cannot be `const`",
        ));
    }
    if sig.asyncness.is_none() {
        return Err(syn::Error::new_spanned(
            sig.fn_token,
            format!("#[kcl::handler] needs an `async fn`: write `async fn {name}(…)`"),
        ));
    }
    if let Some(u) = &sig.unsafety {
        return Err(syn::Error::new_spanned(
            u,
            "a #[kcl::handler] cannot be `unsafe`",
        ));
    }
    if let Some(abi) = &sig.abi {
        return Err(syn::Error::new_spanned(
            abi,
            "a #[kcl::handler] cannot be `extern`",
        ));
    }
    if !sig.generics.params.is_empty() || sig.generics.where_clause.is_some() {
        return Err(syn::Error::new_spanned(
            &sig.generics,
            "a #[kcl::handler] cannot be generic: remove the generic parameters and name the \
             record type, e.g. `order: Order`",
        ));
    }
    if let Some(v) = &sig.variadic {
        return Err(syn::Error::new_spanned(
            v,
            "a #[kcl::handler] cannot be variadic",
        ));
    }
    let mut params = Vec::new();
    for input in &sig.inputs {
        match input {
            FnArg::Receiver(r) => {
                return Err(syn::Error::new_spanned(
                    r,
                    "a #[kcl::handler] is a free function, not a method: remove `self` and \
                     define the handler outside the `impl` block",
                ))
            }
            FnArg::Typed(t) => params.push(t),
        }
    }
    let Some(first) = params.first() else {
        return Err(syn::Error::new(
            sig.paren_token.span.join(),
            format!(
                "a #[kcl::handler] takes the decoded record, e.g. `async fn {name}(order: \
                 Order)`, or a batch of them, e.g. `async fn {name}(orders: Vec<Order>)`"
            ),
        ));
    };
    if let Some(extra) = params.get(2) {
        return Err(syn::Error::new_spanned(
            extra,
            "a #[kcl::handler] takes at most two parameters: the record (or the batch) and its \
             metadata, `&kcl::Record` (or `&[kcl::Record]` for a batch)",
        ));
    }
    let (shape, item) = classify(&first.ty)?;
    let kind = kind_of(&item);
    let codec = resolve_codec(codec, kind, &item, shape)?;
    let with_meta = match params.get(1) {
        Some(meta) => {
            check_meta(&meta.ty, shape)?;
            true
        }
        None => false,
    };
    Ok(generate(func, shape, &item, codec, with_meta))
}

/// The shape and the record type of the first parameter.
fn classify(ty: &Type) -> syn::Result<(Shape, Type)> {
    match ty {
        Type::Reference(r) => {
            if r.mutability.is_some() {
                return Err(syn::Error::new_spanned(
                    ty,
                    "a #[kcl::handler] cannot take `&mut`: take the record by value (`order: \
                     Order`), or a batch as `Vec<Order>` or `&[Order]`",
                ));
            }
            match &*r.elem {
                Type::Slice(s) if is_u8(&s.elem) => Ok((Shape::Record, ty.clone())),
                Type::Slice(s) => Ok((Shape::Batch { by_ref: true }, (*s.elem).clone())),
                Type::Path(p) if p.qself.is_none() && p.path.is_ident("str") => {
                    Ok((Shape::Record, ty.clone()))
                }
                elem => Err(syn::Error::new_spanned(
                    ty,
                    format!(
                        "take the record by value: `{}` (each record is decoded into a new \
                         value), or a batch as `&[{}]`",
                        show(elem),
                        show(elem)
                    ),
                )),
            }
        }
        Type::ImplTrait(_) | Type::Infer(_) | Type::TraitObject(_) => Err(syn::Error::new_spanned(
            ty,
            "a #[kcl::handler] needs a concrete record type, e.g. `order: Order`",
        )),
        _ => match vec_element(ty) {
            Some(elem) if is_u8(elem) => Ok((Shape::Record, ty.clone())),
            Some(elem) => Ok((Shape::Batch { by_ref: false }, elem.clone())),
            None => Ok((Shape::Record, ty.clone())),
        },
    }
}

/// `T` of `Vec<T>` (any path ending in `Vec` with one type argument).
fn vec_element(ty: &Type) -> Option<&Type> {
    let Type::Path(p) = ty else { return None };
    let last = p.path.segments.last()?;
    if p.qself.is_some() || last.ident != "Vec" {
        return None;
    }
    let PathArguments::AngleBracketed(args) = &last.arguments else {
        return None;
    };
    match args.args.iter().collect::<Vec<_>>().as_slice() {
        [GenericArgument::Type(t)] => Some(t),
        _ => None,
    }
}

fn is_u8(ty: &Type) -> bool {
    matches!(ty, Type::Path(p) if p.qself.is_none() && p.path.is_ident("u8"))
}

/// `ty` as written, roughly (`bytes::Bytes`, not `bytes :: Bytes`).
fn show(ty: &Type) -> String {
    let mut s = ty.to_token_stream().to_string();
    for (from, to) in [
        (" :: ", "::"),
        (":: ", "::"),
        ("& ", "&"),
        (" <", "<"),
        ("< ", "<"),
        (" >", ">"),
        (" ,", ","),
    ] {
        s = s.replace(from, to);
    }
    s
}

/// The last path segment's name, if `ty` is a path without generic arguments.
fn plain_name(ty: &Type) -> Option<String> {
    let Type::Path(p) = ty else { return None };
    let last = p.path.segments.last()?;
    (p.qself.is_none() && last.arguments.is_none()).then(|| last.ident.to_string())
}

fn kind_of(ty: &Type) -> Kind {
    if let Type::Reference(r) = ty {
        return match &*r.elem {
            Type::Slice(s) if is_u8(&s.elem) => Kind::Raw,
            Type::Path(p) if p.qself.is_none() && p.path.is_ident("str") => Kind::Str,
            _ => Kind::Other,
        };
    }
    if vec_element(ty).is_some_and(is_u8) {
        return Kind::Raw;
    }
    match plain_name(ty).as_deref() {
        Some("Bytes") => Kind::Raw,
        Some("String") => Kind::String,
        _ => Kind::Other,
    }
}

fn resolve_codec(
    given: Option<Codec>,
    kind: Kind,
    item: &Type,
    shape: Shape,
) -> syn::Result<Codec> {
    let shown = show(item);
    let fail = |msg: String| Err(syn::Error::new_spanned(item, msg));
    let batch = matches!(shape, Shape::Batch { .. });
    match (given, kind) {
        (Some(Codec::Json), Kind::Raw) => {
            fail(format!(
            "#[kcl::handler(json)] decodes {} into a `serde::Deserialize` type, not into the raw \
             payload `{shown}`: write #[kcl::handler(bytes)]",
            if batch { "each record of the batch" } else { "the record" }
        ))
        }
        (Some(Codec::Json), Kind::Str) => fail(format!(
            "#[kcl::handler(json)] decodes into owned values, not `{shown}`: take `String` for a \
             JSON string, or write #[kcl::handler(text)] for the payload as text"
        )),
        (Some(Codec::Raw), Kind::Str | Kind::String) => fail(format!(
            "#[kcl::handler(bytes)] hands over the raw payload (`bytes::Bytes`, `Vec<u8>` or \
             `&[u8]`), not `{shown}`: write #[kcl::handler(text)] for UTF-8 text"
        )),
        (Some(Codec::Text), Kind::Raw) => fail(format!(
            "#[kcl::handler(text)] hands over `String` or `&str`, not `{shown}`: write \
             #[kcl::handler(bytes)] for the raw payload"
        )),
        (Some(codec), _) => Ok(codec),
        (None, Kind::Raw) => Ok(Codec::Raw),
        (None, Kind::Str) => Ok(Codec::Text),
        (None, Kind::String) => fail(
            "a `String` record is ambiguous: write #[kcl::handler(text)] for the payload as \
             UTF-8 text, or #[kcl::handler(json)] for a JSON string"
                .to_owned(),
        ),
        (None, Kind::Other) => Ok(Codec::Json),
    }
}

/// The second parameter: `&Record` per record, `&[Record]` per batch.
fn check_meta(ty: &Type, shape: Shape) -> syn::Result<()> {
    let is_record = |t: &Type| plain_name(t).as_deref() == Some("Record");
    let ok = match (ty, shape) {
        (Type::Reference(r), Shape::Record) => r.mutability.is_none() && is_record(&r.elem),
        (Type::Reference(r), Shape::Batch { .. }) => {
            r.mutability.is_none() && matches!(&*r.elem, Type::Slice(s) if is_record(&s.elem))
        }
        _ => false,
    };
    if ok {
        return Ok(());
    }
    Err(syn::Error::new_spanned(
        ty,
        match shape {
            Shape::Record => {
                "the second parameter of a #[kcl::handler] is the record's metadata: `record: \
                 &kcl::Record`"
            }
            Shape::Batch { .. } => {
                "the second parameter of a batch #[kcl::handler] is the records' metadata: \
                 `records: &[kcl::Record]`"
            }
        },
    ))
}

/// Gives every elided lifetime (`&T`, `'_`) the name `'r`.
struct NameLifetimes;

impl VisitMut for NameLifetimes {
    fn visit_type_reference_mut(&mut self, r: &mut syn::TypeReference) {
        if r.lifetime.is_none() {
            r.lifetime = Some(Lifetime::new("'r", Span::call_site()));
        }
        syn::visit_mut::visit_type_reference_mut(self, r);
    }

    fn visit_lifetime_mut(&mut self, l: &mut Lifetime) {
        if l.ident == "_" {
            *l = Lifetime::new("'r", Span::call_site());
        }
    }
}

/// `call`'s output as a `Result<(), BoxError>`; a type error points at the return type.
fn output(call: &TokenStream, out_span: Span) -> TokenStream {
    let value = Ident::new("__kcl_output", out_span);
    quote_spanned! {out_span=>
        {
            let #value = #call.await;
            ::kcl::service::HandlerOutput::into_result(#value)
        }
    }
}

fn generate(
    func: &ItemFn,
    shape: Shape,
    item: &Type,
    codec: Codec,
    with_meta: bool,
) -> TokenStream {
    let name = &func.sig.ident;
    let vis = &func.vis;
    let mut item_r = item.clone();
    NameLifetimes.visit_type_mut(&mut item_r);
    let codec_path = codec.path();
    // Locals of the expansion: invisible to the user's code and vice versa.
    let items = Ident::new("items", Span::mixed_site());
    let records = Ident::new("records", Span::mixed_site());
    let one_item = Ident::new("item", Span::mixed_site());
    let one_record = Ident::new("record", Span::mixed_site());
    let out_span = match &func.sig.output {
        ReturnType::Type(_, ty) => ty.span(),
        ReturnType::Default => name.span(),
    };
    let decode = quote_spanned! {item.span()=>
        <#item_r as ::kcl::service::codec::Decode<'r, #codec_path>>::decode(#one_record)
    };
    let (delivery, body) = match shape {
        Shape::Record => {
            let call = if with_meta {
                quote!(#name(#one_item, #one_record))
            } else {
                quote!(#name(#one_item))
            };
            let output = output(&call, out_span);
            let each = if with_meta {
                quote! {
                    for (#one_item, #one_record) in ::core::iter::Iterator::zip(
                        ::core::iter::IntoIterator::into_iter(#items),
                        #records,
                    ) {
                        #output?;
                    }
                }
            } else {
                quote! {
                    let _ = #records;
                    for #one_item in #items {
                        #output?;
                    }
                }
            };
            (
                quote!(Record),
                quote! {
                    #each
                    ::core::result::Result::<(), ::kcl::error::BoxError>::Ok(())
                },
            )
        }
        Shape::Batch { by_ref } => {
            let arg = if by_ref {
                quote!(&#items)
            } else {
                quote!(#items)
            };
            let call = if with_meta {
                quote!(#name(#arg, #records))
            } else {
                quote!(#name(#arg))
            };
            let output = output(&call, out_span);
            let unused = (!with_meta).then(|| quote!(let _ = #records;));
            (quote!(Batch), quote!(#unused #output))
        }
    };
    let what = match shape {
        Shape::Record => "one record per call",
        Shape::Batch { .. } => "a batch of records per call",
    };
    let codec_name = match codec {
        Codec::Json => "JSON",
        Codec::Raw => "the raw payload",
        Codec::Text => "UTF-8 text",
    };
    let doc = format!(
        "The record handler `{name}()` as a processor factory ({what}, {codec_name}), \
         generated by `#[kcl::handler]`: `{name}::factory()` creates one processor per shard \
         lease."
    );
    quote! {
        #func

        #[doc = #doc]
        #[allow(non_camel_case_types, dead_code)]
        #[derive(Clone, Copy, Debug, Default)]
        #vis struct #name {}

        #[allow(dead_code)]
        impl #name {
            /// Creates one processor per shard lease, for `Worker::builder().processor(…)`
            /// or `kcl::service::Service::new(…)`.
            #vis fn factory() -> ::kcl::service::HandlerFactory<#name> {
                ::kcl::service::HandlerFactory::new(#name {})
            }
        }

        impl ::kcl::service::Handler for #name {
            type Item<'r> = #item_r;
            const DELIVERY: ::kcl::service::Delivery = ::kcl::service::Delivery::#delivery;

            fn decode<'r>(
                &self,
                #one_record: &'r ::kcl::Record,
            ) -> ::core::result::Result<Self::Item<'r>, ::kcl::error::BoxError> {
                ::core::result::Result::map_err(#decode, ::core::convert::Into::into)
            }

            fn handle<'r>(
                &'r self,
                #items: ::std::vec::Vec<Self::Item<'r>>,
                #records: &'r [::kcl::Record],
            ) -> ::kcl::service::HandlerFuture<'r> {
                ::std::boxed::Box::pin(async move { #body })
            }
        }
    }
}
