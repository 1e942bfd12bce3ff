//! The page's words in Japanese and English, in one table ([`T`]), and which language a
//! request gets: the switch's cookie [`LANG_COOKIE`] (set by `?lang=ja` or `?lang=en` on
//! any page), else the first of `ja` and `en` in the browser's `Accept-Language`, else
//! Japanese.

use axum::http::HeaderMap;

use crate::gateway::jobs::Cause;

/// The cookie that keeps the language chosen with the switch.
pub const LANG_COOKIE: &str = "cloudpdi_lang";

/// A language of the page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lang {
    /// 日本語.
    Ja,
    /// English.
    En,
}

impl Lang {
    /// The `lang` attribute and the switch's value.
    pub fn code(self) -> &'static str {
        match self {
            Lang::Ja => "ja",
            Lang::En => "en",
        }
    }

    /// `ja` or `en`, else `None`.
    pub fn parse(code: &str) -> Option<Lang> {
        match code.trim() {
            "ja" => Some(Lang::Ja),
            "en" => Some(Lang::En),
            _ => None,
        }
    }

    /// The other language (the switch offers it).
    pub fn other(self) -> Lang {
        match self {
            Lang::Ja => Lang::En,
            Lang::En => Lang::Ja,
        }
    }

    /// The language of a request: `chosen` (the switch), its cookie, the browser's
    /// `Accept-Language`, else Japanese.
    pub fn of(headers: &HeaderMap, chosen: Option<Lang>) -> Lang {
        if let Some(lang) = chosen {
            return lang;
        }
        if let Some(lang) = super::cookie(headers, LANG_COOKIE).and_then(|c| Lang::parse(&c)) {
            return lang;
        }
        let accept = headers
            .get(axum::http::header::ACCEPT_LANGUAGE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        accept
            .split(',')
            .filter_map(|part| {
                let tag = part.split(';').next()?.trim().to_ascii_lowercase();
                let q = part
                    .split(';')
                    .find_map(|p| p.trim().strip_prefix("q="))
                    .and_then(|q| q.parse::<f32>().ok())
                    .unwrap_or(1.0);
                let lang = Lang::parse(tag.split('-').next()?)?;
                (q > 0.0).then_some((q, lang))
            })
            .fold(None, |best: Option<(f32, Lang)>, (q, lang)| match best {
                Some((bq, _)) if bq >= q => best,
                _ => Some((q, lang)),
            })
            .map_or(Lang::Ja, |(_, lang)| lang)
    }
}

/// Every text of the page, by what it says (the variant names the text; [`T::get`] has
/// both languages in one `match`, so a text cannot lack one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum T {
    App,
    NavReceive,
    NavJobs,
    NavSent,
    Logout,
    SignedInAs,
    Switch,
    Skip,
    LoginTitle,
    UserName,
    Password,
    LoginButton,
    LoginFailed,
    LockedName,
    LockedAddress,
    SessionEnded,
    LoggedOut,
    ReceiveTitle,
    TokenLabel,
    TokenHelp,
    PatientIdLabel,
    PatientIdHelp,
    ImportButton,
    CameraButton,
    CameraStop,
    CheckOk,
    CheckGroup,
    CheckPrefix,
    CheckVersion1,
    CheckChar,
    CheckLength,
    CheckTooLong,
    TokenExpired,
    PatientIdBad,
    NoInbound,
    JobTitle,
    StepUpload,
    StepIssue,
    StepDeliver,
    StepPost,
    StepDownload,
    StepOpen,
    StepUnpack,
    StepImport,
    StepReceipt,
    StepDone,
    StepFailed,
    Stored,
    Done,
    Failed,
    Held,
    Retrying,
    AlreadyImported,
    AlreadyRunning,
    Refused,
    ReceiveAnother,
    JobsTitle,
    NoJobs,
    Job,
    Direction,
    Study,
    Reason,
    Detail,
    Action,
    Retry,
    Retried,
    Outbound,
    Inbound,
    SentTitle,
    NoSent,
    Route,
    Expiry,
    Downloads,
    Receipts,
    ReceiptLine,
    Reprint,
    NotKnown,
    None,
    PatientId,
    Accession,
    StudyDate,
    Modality,
    Expired,
    NotFound,
    Forbidden,
    RetryUnknown,
    RetryNotFailed,
    RetryEnded,
    RetryRevoked,
    TokenUnreadable,
    TokenVersion,
    TooManyStreams,
    PatientIdNotApplied,
    TooLarge,
    TooSlow,
    Unavailable,
    State,
    Progress,
    Live,
    CausePacsRejected,
    CausePacsUnreachable,
    CausePacsBusy,
    CauseRepositoryUnreachable,
    CauseRepositoryRefused,
    CauseDiskFull,
    CauseLocalIo,
    CauseInvalidToken,
    CauseInvalidContainer,
    CauseInvalidPdi,
    CauseCrashed,
    CauseRecipientKey,
    CauseOther,
    PatientName,
    StudyDescription,
    Revoke,
    Extend,
    RevokedAt,
    RevokeTitle,
    RevokeWarning,
    RevokeButton,
    Cancel,
    RevokedNotice,
    AlreadyRevoked,
    ExtendTitle,
    ExtendHelp,
    ExtendDaysLabel,
    ExtendDaysButton,
    ExtendUntilLabel,
    ExtendUntilButton,
    ExtendedNotice,
    PrintNewSlip,
    ExtendDaysBad,
    ExtendDateBad,
    ExtendNothing,
    SlipUnknown,
    SlipNotIssued,
    SlipBusy,
    SlipRevoked,
    SlipNotLater,
    SlipRefused,
    SlipUnreachable,
    SlipRoute,
    SlipFiles,
    SlipTimedOut,
    ReprintRevoked,
}

impl T {
    /// The text in `lang`. `{name}` marks a value filled in with [`fill`].
    pub(crate) fn get(self, lang: Lang) -> &'static str {
        let (ja, en) = self.both();
        match lang {
            Lang::Ja => ja,
            Lang::En => en,
        }
    }

    fn both(self) -> (&'static str, &'static str) {
        match self {
            T::App => ("Cloud-PDI 受付", "Cloud-PDI reception"),
            T::NavReceive => ("受け取り", "Receive"),
            T::NavJobs => ("失敗したジョブ", "Failed jobs"),
            T::NavSent => ("発行したトークン", "Sent"),
            T::Logout => ("ログアウト", "Log out"),
            T::SignedInAs => ("ログイン中:", "Signed in as"),
            T::Switch => ("English", "日本語"),
            T::Skip => ("本文へ移動", "Skip to the content"),
            T::LoginTitle => ("ログイン", "Log in"),
            T::UserName => ("ユーザー名", "User name"),
            T::Password => ("パスワード", "Password"),
            T::LoginButton => ("ログイン", "Log in"),
            T::LoginFailed => (
                "ユーザー名またはパスワードが違います。",
                "Wrong user name or password.",
            ),
            T::LockedName => (
                "ログインの失敗が続いたため、この端末からはこのユーザー名で {until} ログインできません（正しいパスワードでも同じです）。時間をおいてからもう一度ログインするか、別の端末から、または管理者に連絡してください。",
                "Too many failed logins: this user name cannot log in from this computer {until}, even with the right password. Try again after that time, from another computer, or ask an administrator.",
            ),
            T::LockedAddress => (
                "この端末からのログインの失敗が続いたため、この端末からは {until} ログインできません（正しいパスワードでも同じです）。時間をおいてからもう一度ログインするか、管理者に連絡してください。",
                "Too many failed logins from this computer: no login from it is accepted {until}, even with the right password. Try again after that time, or ask an administrator.",
            ),
            T::SessionEnded => (
                "セッションが終了しました。もう一度ログインしてください。",
                "Your session ended: log in again.",
            ),
            T::LoggedOut => ("ログアウトしました。", "You are logged out."),
            T::ReceiveTitle => ("トークンの受け取り", "Receive a token"),
            T::TokenLabel => ("トークン", "Token"),
            T::TokenHelp => (
                "控えのQRコードをスキャナーで読み取るか、HT2- から始まる文字を入力して Enter を押してください。",
                "Scan the slip's QR code, or type the text starting with HT2- and press Enter.",
            ),
            T::PatientIdLabel => ("院内の患者ID（任意）", "Local Patient ID (optional)"),
            T::PatientIdHelp => (
                "入力すると、この患者IDで取り込みます（トークンを読み取る前に入力してください。読み取りの Enter ですぐに取り込みが始まります）。空欄なら設定どおりです。",
                "When given, the study is filed under this Patient ID: type it before scanning the token (the scanner's Enter starts the import at once). Empty: as configured.",
            ),
            T::ImportButton => ("取り込む", "Import"),
            T::CameraButton => ("カメラで読み取る", "Scan with the camera"),
            T::CameraStop => ("カメラを止める", "Stop the camera"),
            T::CheckOk => (
                "トークンは正しく読み取れました。",
                "The token reads correctly.",
            ),
            T::CheckGroup => (
                "チェックコードが一致しません: {group} 番目のグループが誤っているようです。",
                "Check code does not match: group {group} looks mistyped.",
            ),
            T::CheckPrefix => (
                "トークンではありません（HT2- で始まります）。",
                "This is not a token (it starts with HT2-).",
            ),
            T::CheckVersion1 => (
                "古い形式（HT1）のトークンは読めません。送り元の病院に新しいトークンを依頼してください。",
                "This old-format (HT1) token cannot be read: ask the sending hospital for a new one.",
            ),
            T::CheckChar => (
                "{position} 文字目はトークンに使われない文字です。",
                "Character {position} is not a token character.",
            ),
            T::CheckLength => (
                "文字数が合いません。グループの抜けや重複がないか確認してください。",
                "The token has a wrong number of characters: check for a missing or extra group.",
            ),
            T::CheckTooLong => (
                "長すぎます。トークンだけを入力してください。",
                "Too long: give the token text alone.",
            ),
            T::TokenExpired => (
                "このトークンは有効期限が切れています。送り元の病院に連絡してください。",
                "This token has expired: contact the sending hospital.",
            ),
            T::PatientIdBad => (
                "院内の患者IDは64文字以内の半角英数字と記号で入力してください（\\ は使えません）。",
                "The local Patient ID must be at most 64 printable ASCII characters, no backslash.",
            ),
            T::NoInbound => (
                "このゲートウェイは取り込みを行いません（inbound.pacs が設定されていません）。管理者に連絡してください。",
                "This gateway does not import (inbound.pacs is not set): ask an administrator.",
            ),
            T::JobTitle => ("取り込み {id}", "Import {id}"),
            T::StepUpload => ("暗号化してリポジトリへ送信中", "Sealing and uploading"),
            T::StepIssue => ("トークンと控えの発行", "Issuing the token and slip"),
            T::StepDeliver => ("トークンの受け渡し", "Handing the token over"),
            T::StepPost => (
                "相手の施設へトークンを送付",
                "Sending the token to the facilities",
            ),
            T::StepDownload => (
                "ダウンロード・検証・PACSへの保存",
                "Downloading, verifying and storing into the PACS",
            ),
            T::StepOpen => ("復号と検証", "Decrypting and verifying"),
            T::StepUnpack => ("展開と検証", "Unpacking and verifying"),
            T::StepImport => ("PACSへ保存中", "Storing into the PACS"),
            T::StepReceipt => ("受領を送り元へ通知", "Telling the sender it arrived"),
            T::StepDone => ("完了", "Finished"),
            T::StepFailed => ("失敗", "Failed"),
            T::Stored => (
                "{stored} / {total} 件を保存",
                "{stored} of {total} instances stored",
            ),
            T::Done => (
                "取り込みが完了しました。PACSで検査を確認できます。",
                "The import finished: the study is in the PACS.",
            ),
            T::Failed => ("取り込みに失敗しました。", "The import failed."),
            T::Held => (
                "停止中です。原因を取り除いてから「失敗したジョブ」で再実行してください。",
                "Held: fix the cause, then retry it on the Failed jobs page.",
            ),
            T::Retrying => ("再試行を待っています。", "Waiting to try again."),
            T::AlreadyImported => (
                "このトークンは取り込み済みです（二重には取り込みません）。",
                "This token was already imported; it is not imported twice.",
            ),
            T::AlreadyRunning => (
                "このトークンはすでに取り込み中です。",
                "This token is already being imported.",
            ),
            T::Refused => (
                "取り込めません。下の理由を管理者に伝えてください（設定で直せることがあります）。",
                "Not imported: show the reason below to an administrator (the configuration may need a change).",
            ),
            T::ReceiveAnother => ("次のトークンを受け取る", "Receive another token"),
            T::JobsTitle => ("失敗・停止中のジョブ", "Failed and held jobs"),
            T::NoJobs => (
                "対応が必要なジョブはありません。",
                "No job needs attention.",
            ),
            T::Job => ("ジョブ", "Job"),
            T::Direction => ("種類", "Direction"),
            T::Study => ("検査", "Study"),
            T::Reason => ("理由", "Reason"),
            T::Detail => ("詳細（管理者向け）", "Detail (for administrators)"),
            T::Action => ("操作", "Action"),
            T::Retry => ("再実行", "Retry"),
            T::Retried => ("ジョブ {id} を再実行します。", "Job {id} runs again."),
            T::Outbound => ("送信", "Sending"),
            T::Inbound => ("受信", "Receiving"),
            T::SentTitle => ("発行したトークン", "Issued tokens"),
            T::NoSent => (
                "発行したトークンはまだありません。",
                "No token was issued yet.",
            ),
            T::Route => ("経路", "Route"),
            T::Expiry => ("有効期限", "Expiry"),
            T::Downloads => ("取得回数", "Downloads"),
            T::Receipts => ("受領", "Receipts"),
            T::ReceiptLine => ("{time} {count} 件を取り込み", "{time}: {count} imported"),
            T::Reprint => ("控えを再印刷", "Re-print the slip"),
            T::NotKnown => ("不明", "not known"),
            T::None => ("なし", "none"),
            T::PatientId => ("患者ID", "Patient ID"),
            T::Accession => ("受付番号", "Accession"),
            T::StudyDate => ("検査日", "Study date"),
            T::Modality => ("モダリティ", "Modality"),
            T::Expired => ("期限切れ", "expired"),
            T::NotFound => ("見つかりません。", "Not found."),
            T::Forbidden => (
                "このフォームは期限切れか、このページから送られたものではありません。ページを読み込み直してから、もう一度操作してください。",
                "This form expired or did not come from this page: reload the page and try again.",
            ),
            T::RetryUnknown => (
                "ジョブ {id} は見つかりません。ジョブの一覧を読み込み直してください。",
                "There is no job {id}: reload the list of jobs.",
            ),
            T::RetryNotFailed => (
                "ジョブ {id} は失敗していません（状態: {state}）。再実行できるのは失敗したジョブだけです。",
                "Job {id} has not failed (it is {state}): only failed jobs can be retried.",
            ),
            T::RetryEnded => (
                "受信ジョブ {id} は最終的に失敗し、そのトークンとファイルは削除されました。もう一度取り込むには、トークンを受信ページで読み取り直してください。",
                "Inbound job {id} failed for good and its token and files were removed: scan the token again on the receive page to import it anew.",
            ),
            T::RetryRevoked => (
                "送信ジョブ {id} のトークンは無効化されているため、再送しません。新しいトークンが必要なら、検査をもう一度送ってください。",
                "The token of outbound job {id} was revoked: it is not sent again; send the study again for a new token.",
            ),
            T::TokenUnreadable => (
                "このトークンは読み取れません。発行した病院に新しいトークンを依頼してください。",
                "This token cannot be read: ask the issuing hospital for a new one.",
            ),
            T::TokenVersion => (
                "このトークンは新しい形式で、この cloudpdi では読めません。管理者に cloudpdi の更新を依頼してください。",
                "This token has a newer format than this cloudpdi reads: ask an administrator to update cloudpdi.",
            ),
            T::TooManyStreams => (
                "進み具合を表示しているページが多すぎます（1 つのログインで 4 つ、全体で 32 まで）。使っていないジョブのページを閉じてから、このページを読み込み直してください。",
                "Too many pages are following a job (at most 4 per login, 32 in all): close the job pages you do not need, then reload this one.",
            ),
            T::PatientIdNotApplied => (
                "入力した患者IDは使われていません。このトークンの取り込みは前に始まっていて、送り元の患者IDで登録されます（または登録済みです）。ローカルの患者IDで登録するには、PACS で患者IDを変更してください。",
                "The Patient ID you entered was NOT applied: this token's import had already started, and the study is (or will be) filed under the sender's Patient ID. To file it under the local ID, change it in the PACS.",
            ),
            T::TooLarge => (
                "送られた内容が大きすぎます（16 KiB まで）。トークンだけを入力して、もう一度送ってください。",
                "What was sent is too large (at most 16 KiB): enter the token alone and send it again.",
            ),
            T::TooSlow => (
                "送信が途中で止まりました（10 秒以内に届きませんでした）。ページを読み込み直して、もう一度送ってください。",
                "The form did not arrive in time (within 10 seconds): reload the page and send it again.",
            ),
            T::Unavailable => (
                "ゲートウェイの記録を読めません。管理者に連絡してください。",
                "The gateway's records cannot be read: ask an administrator.",
            ),
            T::State => ("状態", "State"),
            T::Progress => ("進み具合", "Progress"),
            T::Live => (
                "このページは自動で更新されます。",
                "This page updates by itself.",
            ),
            T::CausePacsRejected => (
                "PACSが受け付けませんでした（AEタイトルや対応する画像の種類の設定）",
                "The PACS refused (its settings for our AE title or the image types)",
            ),
            T::CausePacsUnreachable => ("PACSに接続できません", "The PACS cannot be reached"),
            T::CausePacsBusy => ("PACSが混み合っています", "The PACS is busy"),
            T::CauseRepositoryUnreachable => (
                "リポジトリ（クラウド）に接続できません",
                "The repository (cloud) cannot be reached",
            ),
            T::CauseRepositoryRefused => (
                "リポジトリが拒否しました（期限切れ・取得回数の上限・取り消し）",
                "The repository refused (expired, downloads used up, or revoked)",
            ),
            T::CauseDiskFull => ("ディスクがいっぱいです", "A disk is full"),
            T::CauseLocalIo => (
                "ファイルの読み書きに失敗しました（権限など）",
                "A local file could not be read or written (permissions)",
            ),
            T::CauseInvalidToken => ("トークンを読めません", "The token cannot be read"),
            T::CauseInvalidContainer => (
                "データを開けません（破損しているか、鍵が合いません）",
                "The data does not open (damaged, or the wrong key)",
            ),
            T::CauseInvalidPdi => (
                "検査データ（PDI）が壊れているか、安全ではありません",
                "The study's files (PDI) are broken or unsafe",
            ),
            T::CauseCrashed => (
                "処理中に異常終了を繰り返しました",
                "The process died during this step again and again",
            ),
            T::CauseRecipientKey => (
                "送り先施設の鍵を確認できません",
                "A receiving facility's key cannot be confirmed",
            ),
            T::CauseOther => ("その他の理由", "Another reason"),
            T::PatientName => ("患者氏名", "Patient name"),
            T::StudyDescription => ("検査内容", "Study description"),
            T::Revoke => ("無効化", "Revoke"),
            T::Extend => ("期限を延長", "Extend"),
            T::RevokedAt => ("{time} に無効化済み", "revoked {time}"),
            T::RevokeTitle => (
                "ジョブ {id} のトークンを無効化",
                "Revoke the token of job {id}",
            ),
            T::RevokeWarning => (
                "無効化すると、リポジトリはこのトークンでのダウンロードをすべて拒否し、検査データを削除します。元に戻せません。患者さんの手元の控えも使えなくなります。",
                "Once revoked, the repository refuses every later download with this token and deletes the study's data. This cannot be undone: the slip the patient holds stops working.",
            ),
            T::RevokeButton => ("このトークンを無効化する", "Revoke this token"),
            T::Cancel => ("やめる（一覧へ戻る）", "Cancel (back to the list)"),
            T::RevokedNotice => (
                "ジョブ {id} のトークンを無効化しました。リポジトリは以後のダウンロードをすべて拒否します。",
                "The token of job {id} is revoked: the repository refuses every later download.",
            ),
            T::AlreadyRevoked => (
                "ジョブ {id} のトークンはすでに無効化されています。",
                "The token of job {id} is already revoked.",
            ),
            T::ExtendTitle => (
                "ジョブ {id} のトークンの有効期限を延長",
                "Extend the expiry of the token of job {id}",
            ),
            T::ExtendHelp => (
                "新しい期限は今の期限より後で、リポジトリの上限（server.max_expiry_days、今日から数えます）以内にしてください。延長したら新しい控えを印刷して患者さんに渡してください。古い控えに印刷された期限は誤りになります。",
                "The new expiry must be later than the current one and within the repository's limit (server.max_expiry_days, counted from today). After extending, print the new slip and hand it to the patient: the date printed on the old slip is then wrong.",
            ),
            T::ExtendDaysLabel => (
                "今日から何日後まで（1〜3650日）",
                "Days from now (1 to 3650)",
            ),
            T::ExtendDaysButton => ("日数で延長する", "Extend by days"),
            T::ExtendUntilLabel => (
                "この日の終わり（23:59:59）まで",
                "Until the end of this day (23:59:59)",
            ),
            T::ExtendUntilButton => ("日付で延長する", "Extend to this date"),
            T::ExtendedNotice => (
                "ジョブ {id} のトークンの有効期限を延長しました（{until}有効）。古い控えに印刷された期限は誤りです。新しい控えを印刷して渡してください。",
                "The token of job {id} is now valid {until}. The date printed on the old slip is wrong: print the new slip and hand it over.",
            ),
            T::PrintNewSlip => ("新しい控えを印刷", "Print the new slip"),
            T::ExtendDaysBad => (
                "日数は 1 から 3650 までの整数で入力してください。",
                "Give the days as a whole number from 1 to 3650.",
            ),
            T::ExtendDateBad => (
                "日付を YYYY-MM-DD の形で入力してください（例: 2026-12-31）。",
                "Give the date as YYYY-MM-DD (e.g. 2026-12-31).",
            ),
            T::ExtendNothing => (
                "延長する日数か日付のどちらか一方を入力してください。",
                "Give either the number of days or a date.",
            ),
            T::SlipUnknown => (
                "ジョブ {id} は見つかりません。発行したトークンの一覧を読み込み直してください。",
                "There is no job {id}: reload the list of issued tokens.",
            ),
            T::SlipNotIssued => (
                "ジョブ {id} にはまだトークンがありません（状態: {state}）。無効化・延長するものがありません。",
                "Job {id} has no token yet (it is {state}): there is nothing to revoke or extend.",
            ),
            T::SlipBusy => (
                "ジョブ {id} はまだトークンを届けている途中です（状態: {state}）。完了してからもう一度延長してください。",
                "Job {id} is still delivering its token (it is {state}): extend it once it is done.",
            ),
            T::SlipRevoked => (
                "ジョブ {id} のトークンは無効化されているため、期限を変えられません。新しいトークンが必要なら、検査をもう一度送ってください。",
                "The token of job {id} was revoked: its expiry cannot change. Send the study again for a new token.",
            ),
            T::SlipNotLater => (
                "期限は延ばすことしかできません。今の期限は{current}です。指定した期限（{asked}）はそれより前です。もっと後を指定してください。",
                "An expiry can only be extended: the token is valid {current}, and the expiry asked for ({asked}) is earlier. Ask for a later date.",
            ),
            T::SlipRefused => (
                "リポジトリが拒否しました: {message}",
                "The repository refused: {message}",
            ),
            T::SlipUnreachable => (
                "リポジトリ（クラウド）に接続できません。応答するようになってから、もう一度操作してください。",
                "The repository (cloud) cannot be reached: try again once it answers.",
            ),
            T::SlipRoute => (
                "このジョブの送信経路ではリポジトリを使えません（経路の削除や変更、APIキー）。管理者に連絡してください。",
                "This job's route has no usable repository (the route was removed or changed, or its API key): ask an administrator.",
            ),
            T::SlipFiles => (
                "トークンと控えのファイルを書き直せませんでした。管理者に連絡してください（リポジトリの延長はそのまま有効です。原因を直してからもう一度延長すれば仕上がります）。",
                "The token and slip files could not be written again: ask an administrator (the repository keeps the extension; extending again once the cause is fixed finishes it).",
            ),
            T::SlipTimedOut => (
                "リポジトリが {seconds} 秒以内に応答しませんでした。処理は続いていて、このあと完了する可能性があります。1 分ほどしてから「発行したトークン」の一覧で結果を確かめ、それからもう一度操作するか決めてください。",
                "The repository did not answer within {seconds} s: the action goes on and may still finish. Look at the Sent list again in a minute before trying again.",
            ),
            T::ReprintRevoked => (
                "ジョブ {id} のトークンは無効化されているため、控えは印刷しません（ダウンロードできません）。",
                "The token of job {id} was revoked: its slip is not printed (it would not download).",
            ),
        }
    }

    /// The plain words for a job's failure cause.
    pub(crate) fn of_cause(cause: Option<Cause>) -> T {
        match cause {
            Some(Cause::PacsRejected) => T::CausePacsRejected,
            Some(Cause::PacsUnreachable) => T::CausePacsUnreachable,
            Some(Cause::PacsBusy) => T::CausePacsBusy,
            Some(Cause::RepositoryUnreachable) => T::CauseRepositoryUnreachable,
            Some(Cause::RepositoryRefused) => T::CauseRepositoryRefused,
            Some(Cause::DiskFull) => T::CauseDiskFull,
            Some(Cause::LocalIo) => T::CauseLocalIo,
            Some(Cause::InvalidToken) => T::CauseInvalidToken,
            Some(Cause::InvalidContainer) => T::CauseInvalidContainer,
            Some(Cause::InvalidPdi) => T::CauseInvalidPdi,
            Some(Cause::Crashed) => T::CauseCrashed,
            Some(Cause::RecipientKey) => T::CauseRecipientKey,
            Some(Cause::Other) | None => T::CauseOther,
        }
    }
}

/// A deadline in `lang`, in `zone`'s wall-clock time: `2026年12月13日 17:37まで`,
/// `until 13 Dec 2026 17:37 (JST)` (the slip's words).
pub fn until(lang: Lang, unix_seconds: u64, zone: &jiff::tz::TimeZone) -> String {
    match lang {
        Lang::Ja => crate::clock::until_ja(unix_seconds, zone),
        Lang::En => crate::clock::until_en(unix_seconds, zone),
    }
}

/// `text` with each `{name}` replaced by its value.
pub fn fill(text: &str, values: &[(&str, &str)]) -> String {
    values.iter().fold(text.to_owned(), |text, (name, value)| {
        text.replace(&format!("{{{name}}}"), value)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn accept(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            axum::http::header::ACCEPT_LANGUAGE,
            HeaderValue::from_str(value).expect("header"),
        );
        headers
    }

    #[test]
    fn the_browser_language_then_the_switch() {
        assert_eq!(Lang::of(&HeaderMap::new(), None), Lang::Ja);
        assert_eq!(Lang::of(&accept("en-US,en;q=0.9,ja;q=0.8"), None), Lang::En);
        assert_eq!(Lang::of(&accept("ja,en-US;q=0.9"), None), Lang::Ja);
        assert_eq!(Lang::of(&accept("fr,en;q=0.5,ja;q=0.7"), None), Lang::Ja);
        assert_eq!(Lang::of(&accept("fr"), None), Lang::Ja);
        assert_eq!(Lang::of(&accept("ja;q=0,en"), None), Lang::En);
        let mut chosen = accept("en");
        chosen.insert(
            axum::http::header::COOKIE,
            HeaderValue::from_static("a=b; cloudpdi_lang=ja"),
        );
        assert_eq!(Lang::of(&chosen, None), Lang::Ja);
        assert_eq!(Lang::of(&chosen, Some(Lang::En)), Lang::En);
    }

    /// Every text (the test below checks against the enum's source that none is missing).
    const ALL: [T; 145] = [
        T::App,
        T::NavReceive,
        T::NavJobs,
        T::NavSent,
        T::Logout,
        T::SignedInAs,
        T::Switch,
        T::Skip,
        T::LoginTitle,
        T::UserName,
        T::Password,
        T::LoginButton,
        T::LoginFailed,
        T::LockedName,
        T::LockedAddress,
        T::SessionEnded,
        T::LoggedOut,
        T::ReceiveTitle,
        T::TokenLabel,
        T::TokenHelp,
        T::PatientIdLabel,
        T::PatientIdHelp,
        T::ImportButton,
        T::CameraButton,
        T::CameraStop,
        T::CheckOk,
        T::CheckGroup,
        T::CheckPrefix,
        T::CheckVersion1,
        T::CheckChar,
        T::CheckLength,
        T::CheckTooLong,
        T::TokenExpired,
        T::PatientIdBad,
        T::NoInbound,
        T::JobTitle,
        T::StepUpload,
        T::StepIssue,
        T::StepDeliver,
        T::StepPost,
        T::StepDownload,
        T::StepOpen,
        T::StepUnpack,
        T::StepImport,
        T::StepReceipt,
        T::StepDone,
        T::StepFailed,
        T::Stored,
        T::Done,
        T::Failed,
        T::Held,
        T::Retrying,
        T::AlreadyImported,
        T::AlreadyRunning,
        T::Refused,
        T::ReceiveAnother,
        T::JobsTitle,
        T::NoJobs,
        T::Job,
        T::Direction,
        T::Study,
        T::Reason,
        T::Detail,
        T::Action,
        T::Retry,
        T::Retried,
        T::Outbound,
        T::Inbound,
        T::SentTitle,
        T::NoSent,
        T::Route,
        T::Expiry,
        T::Downloads,
        T::Receipts,
        T::ReceiptLine,
        T::Reprint,
        T::NotKnown,
        T::None,
        T::PatientId,
        T::Accession,
        T::StudyDate,
        T::Modality,
        T::Expired,
        T::NotFound,
        T::Forbidden,
        T::RetryUnknown,
        T::RetryNotFailed,
        T::RetryEnded,
        T::RetryRevoked,
        T::TokenUnreadable,
        T::TokenVersion,
        T::TooManyStreams,
        T::PatientIdNotApplied,
        T::TooLarge,
        T::TooSlow,
        T::Unavailable,
        T::State,
        T::Progress,
        T::Live,
        T::CausePacsRejected,
        T::CausePacsUnreachable,
        T::CausePacsBusy,
        T::CauseRepositoryUnreachable,
        T::CauseRepositoryRefused,
        T::CauseDiskFull,
        T::CauseLocalIo,
        T::CauseInvalidToken,
        T::CauseInvalidContainer,
        T::CauseInvalidPdi,
        T::CauseCrashed,
        T::CauseRecipientKey,
        T::CauseOther,
        T::PatientName,
        T::StudyDescription,
        T::Revoke,
        T::Extend,
        T::RevokedAt,
        T::RevokeTitle,
        T::RevokeWarning,
        T::RevokeButton,
        T::Cancel,
        T::RevokedNotice,
        T::AlreadyRevoked,
        T::ExtendTitle,
        T::ExtendHelp,
        T::ExtendDaysLabel,
        T::ExtendDaysButton,
        T::ExtendUntilLabel,
        T::ExtendUntilButton,
        T::ExtendedNotice,
        T::PrintNewSlip,
        T::ExtendDaysBad,
        T::ExtendDateBad,
        T::ExtendNothing,
        T::SlipUnknown,
        T::SlipNotIssued,
        T::SlipBusy,
        T::SlipRevoked,
        T::SlipNotLater,
        T::SlipRefused,
        T::SlipUnreachable,
        T::SlipRoute,
        T::SlipFiles,
        T::SlipTimedOut,
        T::ReprintRevoked,
    ];

    #[test]
    fn every_text_has_both_languages_and_the_same_values() {
        let source = include_str!("i18n.rs");
        let start = source.find("pub(crate) enum T {").expect("the enum") + 19;
        let end = start + source[start..].find("\n}").expect("its end");
        let declared: Vec<&str> = source[start..end]
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with("///"))
            .map(|l| l.trim_end_matches(','))
            .collect();
        let listed: Vec<String> = ALL.iter().map(|t| format!("{t:?}")).collect();
        assert_eq!(declared, listed, "ALL lists every text");
        for t in ALL {
            let (ja, en) = t.both();
            let names = |s: &str| {
                let mut v: Vec<String> = s
                    .split('{')
                    .skip(1)
                    .filter_map(|p| p.split_once('}').map(|(n, _)| n.to_owned()))
                    .collect();
                v.sort();
                v
            };
            assert!(!ja.is_empty() && !en.is_empty());
            assert_eq!(names(ja), names(en), "{t:?}");
        }
        assert_eq!(
            fill(T::CheckGroup.get(Lang::En), &[("group", "3")]),
            "Check code does not match: group 3 looks mistyped."
        );
    }
}
